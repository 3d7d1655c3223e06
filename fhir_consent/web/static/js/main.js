// The patient app: sign-in, navigation between the five screens, data loading, live updates.

import { h, replace } from "./dom.js";
import { createClient } from "./fhir.js";
import { connect } from "./events.js";
import { createNames, referencesIn } from "./names.js";
import { whoText } from "./consent.js";
import { completeSignIn, currentSession, discover, loadConfig, signIn, signOut } from "./smart.js";
import * as inquiries from "./views/inquiries.js";
import * as access from "./views/access.js";
import * as documents from "./views/documents.js";
import * as log from "./views/log.js";
import * as ledger from "./views/ledger.js";

const VIEWS = {
  inquiries: { label: "Inquiries", view: inquiries },
  access: { label: "Who can see my records", view: access },
  documents: { label: "My documents", view: documents },
  log: { label: "Access log", view: log },
  ledger: { label: "Ledger", view: ledger },
};

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const header = document.getElementById("account");
const live = document.getElementById("live");
const announcer = document.getElementById("announce");
const toast = document.getElementById("toast");

let toastTimer = null;
function announce(text) {
  announcer.textContent = text;
  toast.textContent = text;
  toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (toast.hidden = true), 5000);
}

function showSignIn(config, message) {
  nav.replaceChildren();
  header.replaceChildren();
  live.textContent = "";
  const button = h("button", { type: "button", class: "primary big", id: "sign-in" }, "Sign in");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await signIn(config, await discover(config.fhirBase));
    } catch (e) {
      button.disabled = false;
      announce(e.message);
    }
  });
  replace(main,
    h("section", { class: "welcome", "aria-labelledby": "view-title" },
      h("h1", { id: "view-title", tabindex: "-1" }, "Your records, your decision"),
      h("p", { class: "lead" },
        "See who asks for your medical records, decide who may see them, follow every access as it happens, and check the tamper-evident ledger yourself."),
      message ? h("p", { class: "error", role: "alert" }, message) : null,
      button));
}

function currentView() {
  const name = window.location.hash.replace(/^#\/?/, "");
  return VIEWS[name] ? name : "inquiries";
}

function start(config, session) {
  let events = null;
  const client = createClient(session, {
    onUnauthorized: () => {
      if (events) events.close();
      signOut();
      showSignIn(config, "Your session has ended. Please sign in again.");
    },
  });
  const self = `Patient/${session.patient}`;
  const app = {
    client,
    session,
    names: createNames(client, self),
    consents: [],
    audit: [],
    documents: [],
    fresh: new Set(),
    filters: { outcome: "all", text: "", mine: false },
    onAuditChange: null,
    announce,
    upsertConsent(consent) {
      const at = app.consents.findIndex((c) => c.id === consent.id);
      if (at >= 0) {
        if (Number(app.consents[at].meta?.versionId) > Number(consent.meta?.versionId)) return;
        app.consents[at] = consent;
      } else {
        app.consents.unshift(consent);
      }
      updateBadges();
      if (["inquiries", "access", "ledger"].includes(currentView())) render(false);
    },
    documentTitle(id) {
      const doc = app.documents.find((d) => d.id === id);
      const attachment = doc?.content?.[0]?.attachment;
      return attachment?.title || doc?.type?.text || doc?.type?.coding?.[0]?.display || null;
    },
  };

  const links = {};
  nav.replaceChildren(h("ul", {}, Object.entries(VIEWS).map(([name, { label }]) => {
    links[name] = h("a", { href: `#/${name}`, "data-view": name }, label, h("span", { class: "count", "aria-hidden": "true" }));
    return h("li", {}, links[name]);
  })));
  const out = h("button", { type: "button", class: "link", id: "sign-out" }, "Sign out");
  out.addEventListener("click", () => {
    if (events) events.close();
    signOut();
    showSignIn(config);
  });
  const who = h("span", { class: "who" });
  header.replaceChildren(who, out);
  client.read("Patient", session.patient).then((p) => {
    const n = p.name?.[0];
    who.textContent = n?.text || [...(n?.given || []), n?.family].filter(Boolean).join(" ");
  }).catch(() => {});

  function updateBadges() {
    const pending = app.consents.filter((c) => c.status === "proposed").length;
    const count = links.inquiries.querySelector(".count");
    count.textContent = pending ? String(pending) : "";
    links.inquiries.setAttribute("aria-label", pending ? `Inquiries, ${pending} waiting` : "Inquiries");
  }

  function render(focus) {
    const name = currentView();
    for (const [key, link] of Object.entries(links)) {
      if (key === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    app.onAuditChange = null;
    const y = window.scrollY;
    replace(main, VIEWS[name].view.render(app));
    document.title = `${VIEWS[name].label} — My health records`;
    if (focus) main.querySelector("h1")?.focus();
    else window.scrollTo(0, y);
  }

  async function loadAll() {
    const pid = session.patient;
    const [consents, audit, docs] = await Promise.all([
      client.search("Consent", { patient: pid, _count: "100" }),
      client.search("AuditEvent", { patient: pid, _sort: "-date", _count: "100" }, 1),
      client.search("DocumentReference", { patient: pid, _count: "100" }).catch(() => []),
    ]);
    app.consents = consents.sort((a, b) => String(b.meta?.lastUpdated).localeCompare(String(a.meta?.lastUpdated)));
    app.audit = audit.sort((a, b) => String(b.recorded).localeCompare(String(a.recorded)));
    app.documents = docs;
    await app.names.load([...consents, ...audit, ...docs].flatMap(referencesIn));
    updateBadges();
  }

  async function onEvent(type, resource) {
    if (type === "Consent") {
      const known = app.consents.find((c) => c.id === resource.id);
      await app.names.load(referencesIn(resource));
      if (!known && resource.status === "proposed") announce(`New inquiry from ${whoText(resource, app.names)}.`);
      app.upsertConsent(resource);
    } else if (type === "AuditEvent") {
      if (app.audit.some((e) => e.id === resource.id)) return;
      await app.names.load(referencesIn(resource));
      app.audit.unshift(resource);
      app.fresh.add(resource.id);
      if (app.onAuditChange) app.onAuditChange();
    }
  }

  let wasLive = false;
  function onState(state) {
    live.dataset.state = state;
    live.textContent = { live: "Live", connecting: "Connecting…", reconnecting: "Reconnecting…", closed: "Offline" }[state] || state;
    if (state === "closed") client.read("Patient", session.patient).catch(() => {}); // 401 → sign in
    if (state === "live") {
      if (wasLive) loadAll().then(() => render(false)).catch(() => {}); // catch up after a gap
      wasLive = true;
    }
  }

  window.addEventListener("hashchange", () => render(true));
  replace(main, h("p", { class: "muted" }, "Loading your records…"));
  loadAll()
    .then(() => {
      render(false);
      events = connect({ url: `${client.base}/$events`, token: session.accessToken, onEvent, onState });
    })
    .catch((e) => replace(main, h("p", { class: "error", role: "alert" }, `Your records could not be loaded: ${e.message}`)));
  setInterval(() => {
    if (currentView() === "access") render(false); // time left
  }, 60000);
}

async function boot() {
  let config;
  try {
    config = await loadConfig();
  } catch (e) {
    replace(main, h("p", { class: "error", role: "alert" }, e.message));
    return;
  }
  let session = null;
  try {
    session = (await completeSignIn(config)) || currentSession();
  } catch (e) {
    showSignIn(config, e.message);
    return;
  }
  if (!session) showSignIn(config);
  else start(config, session);
}

boot();
