// Screen (d): the access log — every access and refused attempt (AuditEvents), newest
// first, filterable; new entries arrive live.

import { h } from "../dom.js";
import { actionVerb, formatDateTime, purposeText, resourceName } from "../format.js";

function requestor(event) {
  const agents = event.agent || [];
  return agents.find((a) => a.requestor) || agents[0] || {};
}

function whoOf(app, event) {
  const agent = requestor(event);
  const person = agent.who?.reference ? app.names.label(agent.who.reference, agent.who.display) : null;
  const client = (event.agent || []).find((a) => a.who?.identifier?.system === "urn:fhir-consent:client");
  const org = client?.who?.reference ? app.names.label(client.who.reference) : null;
  if (person && org && person !== org) return `${person} (${org})`;
  return person || org || client?.who?.identifier?.value || agent.who?.display || "Someone";
}

function isMine(app, event) {
  const agent = requestor(event);
  return Boolean(agent.who?.reference && app.names.isSelf(agent.who.reference));
}

function whatOf(app, event) {
  const refs = (event.entity || [])
    .filter((e) => e.role?.code === "4" && e.what?.reference)
    .map((e) => e.what.reference);
  const query = (event.entity || []).find((e) => e.description)?.description;
  if (refs.length) {
    const types = [...new Set(refs.map((r) => resourceName(r.split("/")[0])))];
    const docs = refs
      .filter((r) => r.startsWith("DocumentReference/"))
      .map((r) => app.documentTitle(r.split("/")[1]))
      .filter(Boolean);
    const titles = [...new Set(docs)].map((t) => `“${t}”`);
    if (titles.length && types.length === 1) {
      return `${titles.length === 1 ? "your document" : "your documents"} ${titles.join(", ")}`;
    }
    return titles.length ? `${types.join(", ")} (${titles.join(", ")})` : types.join(", ");
  }
  if (query) return resourceName(query.split("?")[0]);
  return "your records";
}

const REASONS = {
  "default-deny": "you have not given permission",
  "consent-explicit": "your consent says no",
  "not permitted": "not permitted",
  scope: "outside the app's permissions",
};

function deniedReason(event) {
  const match = /\(([^)]*)\)/.exec(event.outcomeDesc || "");
  return match ? REASONS[match[1]] || match[1] : null;
}

function permitted(event) {
  return event.outcome === "0" || event.outcome === undefined;
}

/** How many accesses one AuditEvent records: the server writes the repeats of one access
 *  within a moment as one AuditEvent, with the count and the period (fhir_consent/audit.py). */
function accessCount(event) {
  for (const entity of event.entity || []) {
    const detail = (entity.detail || []).find((d) => d.type === "accesses");
    if (detail && /^\d+$/.test(detail.valueString || "")) return Number(detail.valueString);
  }
  return 1;
}

function entry(app, event) {
  const ok = permitted(event);
  const times = accessCount(event);
  const interaction = event.subtype?.[0]?.code;
  const purposes = (event.purposeOfEvent || []).map((p) => purposeText(p.coding?.[0])).filter(Boolean);
  const consents = (event.entity || []).filter((e) => e.role?.code === "13").length;
  return h("li", { class: `log-entry ${ok ? "permitted" : "denied"}${app.fresh.has(event.id) ? " fresh" : ""}`, "data-id": event.id },
    h("div", { class: "when" }, h("time", { datetime: event.recorded }, formatDateTime(event.recorded))),
    h("div", { class: "what" },
      h("strong", {}, whoOf(app, event)),
      ok ? ` ${actionVerb(interaction)} ${whatOf(app, event)}` : ` tried to access ${whatOf(app, event)}`),
    h("div", { class: "meta" },
      h("span", { class: `badge ${ok ? "ok" : "denied"}` }, ok ? "Permitted" : "Denied"),
      times > 1 ? ` · ${times} times, until ${formatDateTime(event.period?.end || event.recorded)}` : "",
      purposes.length ? ` · Purpose: ${purposes.join(", ")}` : "",
      consents ? " · Decided by your consent" : "",
      !ok && deniedReason(event) ? ` · Why: ${deniedReason(event)}` : ""));
}

function filterBar(app, rerender) {
  const f = app.filters;
  const outcome = h("select", { id: "log-outcome", onchange: (e) => { f.outcome = e.target.value; rerender(); } },
    h("option", { value: "all" }, "All"),
    h("option", { value: "permitted" }, "Permitted"),
    h("option", { value: "denied" }, "Denied"));
  outcome.value = f.outcome;
  const text = h("input", { type: "search", id: "log-text", value: f.text, placeholder: "Clinic, person, record…",
    oninput: (e) => { f.text = e.target.value; rerender(); } });
  const mine = h("input", { type: "checkbox", id: "log-mine", checked: f.mine,
    onchange: (e) => { f.mine = e.target.checked; rerender(); } });
  return h("form", { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
    h("div", {}, h("label", { for: "log-outcome" }, "Outcome"), outcome),
    h("div", { class: "grow" }, h("label", { for: "log-text" }, "Search"), text),
    h("div", { class: "check" }, mine, h("label", { for: "log-mine" }, "Show my own activity")));
}

function visible(app) {
  const f = app.filters;
  const needle = f.text.trim().toLowerCase();
  return app.audit.filter((event) => {
    if (!f.mine && isMine(app, event)) return false;
    if (f.outcome === "permitted" && !permitted(event)) return false;
    if (f.outcome === "denied" && permitted(event)) return false;
    if (needle) {
      const text = `${whoOf(app, event)} ${whatOf(app, event)}`.toLowerCase();
      if (!text.includes(needle)) return false;
    }
    return true;
  });
}

/** Render the screen; `list` is re-rendered alone when filters change or events arrive. */
export function render(app) {
  const list = h("ol", { class: "log", id: "access-log", "aria-live": "polite", "aria-relevant": "additions" });
  const count = h("p", { class: "muted small", id: "log-count" });
  const empty = h("p", { class: "empty", hidden: true }, "Nothing to show.");
  const fill = () => {
    const events = visible(app);
    list.replaceChildren(...events.map((e) => entry(app, e)));
    empty.hidden = events.length > 0;
    count.textContent = `${events.length} of ${app.audit.length} entries`;
  };
  fill();
  app.onAuditChange = fill;
  return h("section", { "aria-labelledby": "view-title" },
    h("h1", { id: "view-title", tabindex: "-1" }, "Access log"),
    h("p", { class: "lead" }, "Every access to your records and every refused attempt, newest first. New entries appear here as they happen."),
    filterBar(app, fill),
    count,
    list,
    empty);
}
