// Screen (a): pending inquiries from clinics — who asked, for what, for how long, why —
// with Grant (optionally narrowed) and Refuse; answered inquiries below.

import { h, nextId } from "../dom.js";
import { formatDate, isoDay, periodEnd, periodLength } from "../format.js";
import {
  STATUS_TEXT, granted, purposeList, requesterText, scopeItems, scopeText, whoText, withStatus,
} from "../consent.js";

function facts(consent, names) {
  const period = consent.provision?.period;
  const end = periodEnd(period);
  const rows = [
    ["Who", whoText(consent, names)],
    ["What", scopeText(consent)],
    ["How long", end ? `${periodLength(period)}, until ${formatDate(period.end)}` : periodLength(period)],
    ["Why", purposeList(consent)],
  ];
  const data = consent.provision?.dataPeriod;
  if (data) rows.push(["Records from", `${formatDate(data.start) || "the start"} to ${formatDate(data.end) || "today"}`]);
  if (consent.dateTime) rows.push(["Asked on", formatDate(consent.dateTime)]);
  return h("dl", { class: "facts" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function narrowing(consent) {
  const period = consent.provision?.period;
  const end = periodEnd(period);
  const dateId = nextId("until");
  const date = h("input", {
    type: "date",
    id: dateId,
    name: "until",
    min: isoDay(new Date()),
    max: end ? isoDay(end) : null,
    value: end ? isoDay(end) : "",
  });
  // only what can be narrowed: a kind with a single item cannot be dropped (that would widen)
  const all = scopeItems(consent);
  const items = all.filter((item) => all.filter((o) => o.kind === item.kind).length > 1);
  const boxes = items.map((item) => {
    const id = nextId("keep");
    return h("div", { class: "check" },
      h("input", { type: "checkbox", id, checked: true, "data-key": item.key, "data-kind": item.kind }),
      h("label", { for: id }, item.text));
  });
  const fields = h("div", { class: "narrow" },
    h("label", { for: dateId }, end ? "Access until (earlier is fine)" : "Access until (optional)"),
    date,
    items.length ? h("fieldset", {}, h("legend", {}, "Share only"), boxes) : null);
  const read = () => {
    const chosen = date.value;
    const keep = new Set([
      ...all.filter((item) => !items.includes(item)).map((item) => item.key),
      ...[...fields.querySelectorAll("input[type=checkbox]")].filter((b) => b.checked).map((b) => b.dataset.key),
    ]);
    const until = chosen && (!end || chosen < isoDay(end)) ? chosen : null;
    return { until, keep: items.length ? keep : undefined };
  };
  return {
    element: h("details", { class: "grant-less" }, h("summary", {}, "Grant less…"), fields),
    read,
  };
}

function inquiryCard(app, consent) {
  const titleId = nextId("inq");
  const narrow = narrowing(consent);
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const buttons = [];

  async function act(label, build, done) {
    error.hidden = true;
    let changed;
    try {
      changed = build();
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
      return;
    }
    buttons.forEach((b) => (b.disabled = true));
    try {
      const saved = await app.client.update(changed);
      app.upsertConsent(saved);
      app.announce(done);
    } catch (e) {
      error.textContent = `${label} did not work: ${e.message}`;
      error.hidden = false;
      buttons.forEach((b) => (b.disabled = false));
    }
  }

  const who = requesterText(consent, app.names);
  const grant = h("button", {
    type: "button",
    class: "primary",
    onclick: () => act("Granting", () => granted(consent, narrow.read()), `Access granted to ${who}.`),
  }, "Grant access");
  const refuse = h("button", {
    type: "button",
    class: "secondary",
    onclick: () => act("Refusing", () => withStatus(consent, "rejected"), `You refused ${who}.`),
  }, "Refuse");
  buttons.push(grant, refuse);
  return h("article", { class: "card inquiry", "aria-labelledby": titleId, "data-id": consent.id },
  h("h2", { id: titleId }, `${who} asks to see your records`),
  facts(consent, app.names),
  narrow.element,
  error,
  h("div", { class: "actions" }, grant, refuse));
}

function answeredItem(app, consent) {
  const status = STATUS_TEXT[consent.status] || consent.status;
  return h("li", { class: `answered status-${consent.status}` },
    h("span", { class: `badge ${consent.status}` }, status),
    " ",
    h("strong", {}, whoText(consent, app.names)),
    ` — ${scopeText(consent)}`,
    h("span", { class: "muted" }, ` · ${formatDate(consent.meta?.lastUpdated)}`));
}

/** Render the screen. */
export function render(app) {
  const pending = app.consents.filter((c) => c.status === "proposed");
  const answered = app.consents.filter((c) => c.status !== "proposed");
  return h("section", { "aria-labelledby": "view-title" },
    h("h1", { id: "view-title", tabindex: "-1" }, "Inquiries"),
    h("p", { class: "lead" }, "Clinics ask before they see your records. Nothing is shared until you say yes."),
    pending.length
      ? pending.map((c) => inquiryCard(app, c))
      : h("p", { class: "empty" }, "No open inquiries. You will see new ones here as they arrive."),
    answered.length ? [h("h2", {}, "Answered and your own decisions"), h("ul", { class: "plain" }, answered.map((c) => answeredItem(app, c)))] : null);
}
