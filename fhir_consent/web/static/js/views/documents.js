// Screen (c): my documents — list, open or download (Binary content fetched with the token).

import { h, nextId } from "../dom.js";
import { conceptText, contentTypeText, formatDate, formatSize } from "../format.js";

function fileName(doc, attachment) {
  const base = (attachment.title || conceptText(doc.type) || `document-${doc.id}`).replace(/[^\w .-]+/g, "_");
  const ext = { "application/pdf": ".pdf", "application/hl7-cda+xml": ".xml", "text/plain": ".txt" }[attachment.contentType] || "";
  return base.toLowerCase().endsWith(ext) ? base : base + ext;
}

function documentCard(app, doc) {
  const titleId = nextId("doc");
  const attachment = (doc.content || [])[0]?.attachment || {};
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const title = attachment.title || conceptText(doc.type) || "Document";
  const authors = (doc.author || []).map((a) => app.names.label(a.reference, a.display));
  if (doc.custodian) authors.push(app.names.label(doc.custodian.reference, doc.custodian.display));
  const date = doc.context?.period?.start || doc.date;

  async function content() {
    error.hidden = true;
    try {
      return await app.client.attachment(attachment.url);
    } catch (e) {
      error.textContent = `The document could not be loaded: ${e.message}`;
      error.hidden = false;
      return null;
    }
  }

  async function open() {
    const blob = await content();
    if (!blob) return;
    const url = URL.createObjectURL(blob);
    window.open(url, "_blank", "noopener");
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  async function download() {
    const blob = await content();
    if (!blob) return;
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: fileName(doc, attachment), class: "hidden" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  return h("article", { class: "card document", "aria-labelledby": titleId, "data-id": doc.id },
    h("h2", { id: titleId }, title),
    h("p", { class: "muted" },
      [conceptText(doc.type), formatDate(date), contentTypeText(attachment.contentType), formatSize(attachment.size)]
        .filter(Boolean).join(" · ")),
    doc.description && doc.description !== title ? h("p", {}, doc.description) : null,
    authors.length ? h("p", { class: "small" }, `From ${[...new Set(authors)].join(", ")}`) : null,
    error,
    attachment.url
      ? h("div", { class: "actions" },
        h("button", { type: "button", class: "primary", onclick: open, "aria-label": `Open ${title}` }, "Open"),
        h("button", { type: "button", class: "secondary", onclick: download, "aria-label": `Download ${title}` }, "Download"))
      : h("p", { class: "muted" }, "No content attached."));
}

/** Render the screen. */
export function render(app) {
  const docs = [...app.documents].sort((a, b) => String(b.date || "").localeCompare(String(a.date || "")));
  return h("section", { "aria-labelledby": "view-title" },
    h("h1", { id: "view-title", tabindex: "-1" }, "My documents"),
    h("p", { class: "lead" }, "Documents your clinics keep about you. They are stored encrypted."),
    docs.length ? docs.map((d) => documentCard(app, d)) : h("p", { class: "empty" }, "No documents yet."));
}
