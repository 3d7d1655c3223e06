// Screen (e): the ledger — each consent change's ledger entry, verified in this browser
// (see ../ledger.js): signatures, Merkle inclusion, and that it records this very version.

import { h } from "../dom.js";
import { formatDateTime } from "../format.js";
import { STATUS_TEXT, requesterText } from "../consent.js";
import { verifyProof } from "../ledger.js";

const EVENT_TEXT = {
  proposed: "Inquiry received",
  granted: "You granted access",
  refused: "You refused",
  revoked: "You revoked access",
  withdrawn: "Inquiry withdrawn",
  created: "Created",
  updated: "Changed",
  deleted: "Deleted",
};

function versionRow(app, consent, version, log) {
  const vid = version.meta?.versionId;
  const status = h("span", { class: "verify checking", role: "status" }, "Checking…");
  const details = h("dl", { class: "facts small" });
  const title = h("span", { class: "event" }, STATUS_TEXT[version.status] || version.status);
  const row = h("li", { class: "ledger-entry", "data-ref": `Consent/${consent.id}/_history/${vid}` },
    h("div", {}, title, h("span", { class: "muted" }, ` · version ${vid} · ${formatDateTime(version.meta?.lastUpdated)}`)),
    status,
    h("details", {}, h("summary", {}, "Entry details"), details));

  (async () => {
    let doc;
    try {
      doc = await app.client.ledgerProof("Consent", consent.id, vid);
    } catch (e) {
      status.className = "verify failed";
      status.textContent = `✗ No proof: ${e.message}`;
      return;
    }
    try {
      const result = await verifyProof(doc, {
        trustedKeys: log ? [log.public_key] : undefined,
        origin: log?.origin,
        resource: version,
      });
      status.className = "verify verified";
      status.textContent = "✓ Verified";
      title.textContent = EVENT_TEXT[result.event] || result.event;
      details.replaceChildren(
        h("dt", {}, "Entry"), h("dd", {}, `#${result.seq} in ${result.origin} (tree size ${result.treeSize})`),
        h("dt", {}, "Recorded"), h("dd", {}, formatDateTime(result.ts)),
        h("dt", {}, "Records"), h("dd", {}, h("code", {}, result.ref)),
        h("dt", {}, "Signed by key"), h("dd", {}, h("code", {}, result.keyId)),
        h("dt", {}, "Tree root"), h("dd", {}, h("code", {}, result.root)));
    } catch (e) {
      status.className = "verify failed";
      status.textContent = `✗ Failed: ${e.message}`;
      details.replaceChildren(h("dt", {}, "Entry"), h("dd", {}, h("code", {}, JSON.stringify(doc.entry || null))));
    }
  })();
  return row;
}

async function fill(app, container, logLine) {
  let log = null;
  try {
    log = await app.client.ledgerCheckpoint();
    logLine.textContent = `Log ${log.origin}, key ${log.key_id || ""}, ${log.size} entries. Proofs are checked against this published key.`;
  } catch {
    logLine.textContent = "The log's published key could not be loaded; each proof is checked against its own key.";
  }
  const consents = [...app.consents].sort((a, b) => String(b.meta?.lastUpdated).localeCompare(String(a.meta?.lastUpdated)));
  if (!consents.length) {
    container.replaceChildren(h("p", { class: "empty" }, "No consent changes yet."));
    return;
  }
  const sections = await Promise.all(consents.map(async (consent) => {
    let versions = [];
    try {
      versions = await app.client.history("Consent", consent.id);
    } catch (e) {
      return h("section", { class: "card" }, h("h2", {}, requesterText(consent, app.names)), h("p", { class: "error" }, e.message));
    }
    versions.sort((a, b) => Number(b.meta?.versionId) - Number(a.meta?.versionId));
    return h("section", { class: "card ledger", "data-id": consent.id },
      h("h2", {}, `Consent for ${requesterText(consent, app.names)}`),
      h("ol", { class: "plain" }, versions.map((v) => versionRow(app, consent, v, log))));
  }));
  container.replaceChildren(...sections);
}

/** Render the screen (verification continues in the background, row by row). */
export function render(app) {
  const container = h("div", { "aria-busy": "true" }, h("p", { class: "muted" }, "Loading…"));
  const logLine = h("p", { class: "muted small", id: "ledger-log" });
  fill(app, container, logLine).finally(() => container.removeAttribute("aria-busy"));
  return h("section", { "aria-labelledby": "view-title" },
    h("h1", { id: "view-title", tabindex: "-1" }, "Ledger"),
    h("p", { class: "lead" },
      "Every change to your consents is written to a tamper-evident ledger. Your browser checks each entry itself: the server's signatures, the entry's place in the Merkle tree, and that it records exactly the version shown."),
    logLine,
    container);
}
