// Screen (b): who can see my records — active Consents with the time left, and Revoke.

import { h, nextId } from "../dom.js";
import { formatDate, timeLeft } from "../format.js";
import { isDeny, purposeList, requesterText, scopeText, whoText, withStatus } from "../consent.js";

function grantCard(app, consent) {
  const titleId = nextId("grant");
  const who = requesterText(consent, app.names);
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const period = consent.provision?.period;
  const left = timeLeft(period);
  const actions = h("div", { class: "actions" });

  const revoke = h("button", { type: "button", class: "danger", onclick: confirm }, "Revoke");
  actions.append(revoke);

  function confirm() {
    const yes = h("button", { type: "button", class: "danger", onclick: doRevoke }, "Yes, revoke");
    const no = h("button", { type: "button", class: "secondary", onclick: () => actions.replaceChildren(revoke) }, "Cancel");
    actions.replaceChildren(h("span", { class: "confirm" }, `Stop ${who} from seeing your records?`), yes, no);
    yes.focus();
  }

  async function doRevoke() {
    actions.querySelectorAll("button").forEach((b) => (b.disabled = true));
    try {
      const saved = await app.client.update(withStatus(consent, "inactive"));
      app.upsertConsent(saved);
      app.announce(`Access revoked for ${who}.`);
    } catch (e) {
      error.textContent = `Revoking did not work: ${e.message}`;
      error.hidden = false;
      actions.replaceChildren(revoke);
    }
  }

  const deny = isDeny(consent);
  return h("article", { class: "card grant", "aria-labelledby": titleId, "data-id": consent.id },
    h("h2", { id: titleId }, deny ? `${who} is blocked` : who),
    h("dl", { class: "facts" },
      h("dt", {}, "Who"), h("dd", {}, whoText(consent, app.names)),
      h("dt", {}, deny ? "Blocked from" : "Can see"), h("dd", {}, scopeText(consent)),
      h("dt", {}, "Until"),
      h("dd", {},
        period?.end ? formatDate(period.end) : "No end date",
        " ",
        h("span", { class: `badge ${left === "expired" ? "expired" : "time"}` }, left)),
      h("dt", {}, "Why"), h("dd", {}, purposeList(consent)),
      h("dt", {}, "Since"), h("dd", {}, formatDate(consent.meta?.lastUpdated))),
    error,
    actions);
}

/** Render the screen. */
export function render(app) {
  const active = app.consents.filter((c) => c.status === "active");
  return h("section", { "aria-labelledby": "view-title" },
    h("h1", { id: "view-title", tabindex: "-1" }, "Who can see my records"),
    h("p", { class: "lead" },
      "These clinics and people have your permission now. Revoking takes effect on their very next request."),
    active.length
      ? active.map((c) => grantCard(app, c))
      : h("p", { class: "empty" }, "Nobody else has your permission right now."),
    h("p", { class: "muted small" },
      "You and your legal representatives always see your own records, and a clinic keeps access to documents it wrote itself unless you block it."));
}
