// In-browser verification of a ledger proof document (ledger.md §2), with WebCrypto only.
// The same checks, in the same order, as fhir_consent/ledger/verify_proof.py:
//   1. the checkpoint is a C2SP signed note whose Ed25519 signature verifies under the log's
//      key (key hash = SHA-256(origin ‖ 0x0A ‖ 0x01 ‖ key)[:4]);
//   2. the entry has exactly the ledger fields and its Ed25519 signature (over the canonical
//      JSON of every field but `sig`) verifies under the key named by `kid`;
//   3. leaf_index = seq < the checkpoint's tree size;
//   4. RFC 9162 §2.1.3.2: SHA-256(0x00 ‖ entry) and the inclusion proof lead to the root;
// plus, when the resource version is given, 5. SHA-256 of its canonical JSON equals the
// entry's resource_sha256 (the entry records exactly the version the patient sees).

export const ENTRY_FIELDS = [
  "seq", "ts", "kind", "ref", "event", "subject", "resource_sha256", "sealed", "kid", "sig",
];
const REQUIRED = ["entry", "leaf_index", "inclusion_proof", "checkpoint", "public_key"];
const OPTIONAL = ["entry_public_key"];
const SIG_PREFIX = "\u2014 ";
const encoder = new TextEncoder();

/** A failed check; the message says which. */
export class ProofError extends Error {}

/** Canonical JSON (RFC 8785): sorted keys (UTF-16 order), no whitespace, ECMAScript numbers. */
export function canonicalJSON(value) {
  if (value === null || typeof value !== "object") {
    if (typeof value === "number" && !Number.isFinite(value)) {
      throw new ProofError("a number cannot be canonicalised");
    }
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map(canonicalJSON).join(",")}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJSON(value[k])}`).join(",")}}`;
}

export function base64Encode(bytes) {
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text);
}

/** Strict, canonical base64 (as the Python verifier): optionally of an exact length. */
export function base64Decode(text, what, length) {
  if (typeof text !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4) {
    throw new ProofError(`${what} is not valid base64`);
  }
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  if (base64Encode(bytes) !== text) throw new ProofError(`${what} is not canonical base64`);
  if (length !== undefined && bytes.length !== length) {
    throw new ProofError(`${what} must be ${length} bytes, not ${bytes.length}`);
  }
  return bytes;
}

export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function equal(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

async function ed25519Verify(publicKey, message, signature) {
  const key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, [
    "verify",
  ]);
  return crypto.subtle.verify({ name: "Ed25519" }, key, signature, message);
}

function checkName(name) {
  if (!name || /[\s+]/.test(name)) {
    throw new ProofError("checkpoint origin / key name is empty or contains spaces or '+'");
  }
}

/** Parse a C2SP tlog-checkpoint signed note. */
export function parseCheckpoint(text) {
  if (typeof text !== "string") throw new ProofError("checkpoint must be a string");
  if (/[\u0000-\u0009\u000b-\u001f]/.test(text)) {
    throw new ProofError("checkpoint contains control characters");
  }
  if (!text.endsWith("\n")) throw new ProofError("checkpoint must end with a newline");
  const split = text.lastIndexOf("\n\n");
  if (split < 0) throw new ProofError("checkpoint has no blank line before its signatures");
  const body = text.slice(0, split + 1);
  const lines = body.split("\n");
  if (lines.length !== 4 || lines[3] !== "" || lines.slice(0, 3).includes("")) {
    throw new ProofError("checkpoint body must be exactly 3 lines: origin, size, root hash");
  }
  const [origin, sizeText, rootText] = lines;
  checkName(origin);
  if (!/^(0|[1-9]\d{0,18})$/.test(sizeText)) {
    throw new ProofError("checkpoint size is not a decimal number without leading zeros");
  }
  const root = base64Decode(rootText, "checkpoint root hash", 32);
  const sigLines = text.slice(split + 2).split("\n").slice(0, -1);
  if (!sigLines.length || sigLines.length > 100) {
    throw new ProofError("checkpoint must carry 1 to 100 signature lines");
  }
  const signatures = sigLines.map((line) => {
    const parts = line.slice(SIG_PREFIX.length).split(" ");
    if (!line.startsWith(SIG_PREFIX) || parts.length !== 2) {
      throw new ProofError("malformed checkpoint signature line");
    }
    checkName(parts[0]);
    const raw = base64Decode(parts[1], "checkpoint signature");
    if (raw.length < 5) throw new ProofError("checkpoint signature is too short");
    return { name: parts[0], raw };
  });
  return { origin, size: BigInt(sizeText), root, body: encoder.encode(body), signatures };
}

/** RFC 9162 §2.1.3.2: the root an inclusion proof leads to (BigInt arithmetic). */
export async function rootFromInclusion(leafHash, index, size, proof) {
  if (index < 0n || index >= size) {
    throw new ProofError(`leaf index ${index} is outside the checkpoint's tree of size ${size}`);
  }
  let fn = index;
  let sn = size - 1n;
  let r = leafHash;
  for (const p of proof) {
    if (sn === 0n) throw new ProofError("inclusion proof is too long for this index and tree size");
    if ((fn & 1n) === 1n || fn === sn) {
      r = await sha256(concat(Uint8Array.of(1), p, r));
      while ((fn & 1n) === 0n && fn !== 0n) {
        fn >>= 1n;
        sn >>= 1n;
      }
    } else {
      r = await sha256(concat(Uint8Array.of(1), r, p));
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) throw new ProofError("inclusion proof is too short for this index and tree size");
  return r;
}

function checkEntryShape(entry) {
  if (!entry || typeof entry !== "object" || Array.isArray(entry)) {
    throw new ProofError("entry must be a JSON object");
  }
  const keys = Object.keys(entry);
  // entries name their pseudonym and RMS keys too (key rotation), except the first format's
  const fields = keys.includes("subject_kid") || keys.includes("rms_kid")
    ? ENTRY_FIELDS.concat(["subject_kid", "rms_kid"]) : ENTRY_FIELDS;
  const missing = fields.filter((f) => !keys.includes(f));
  const extra = keys.filter((k) => !fields.includes(k));
  if (missing.length || extra.length) {
    throw new ProofError(`entry fields: missing [${missing}], unexpected [${extra}]`);
  }
  if (!Number.isSafeInteger(entry.seq) || entry.seq < 0) {
    throw new ProofError("entry seq must be a non-negative safe integer");
  }
  for (const name of fields.slice(1)) {
    if (typeof entry[name] !== "string") throw new ProofError(`entry ${name} must be a string`);
  }
}

/**
 * Verify a proof document. Options: `trustedKeys` (base64 keys the log is known by),
 * `origin` (expected checkpoint origin), `resource` (the resource version the entry should
 * record). Resolves to a summary; rejects with ProofError naming the failed check.
 */
export async function verifyProof(doc, { trustedKeys, origin, resource } = {}) {
  if (!doc || typeof doc !== "object") throw new ProofError("the proof document must be a JSON object");
  const keys = Object.keys(doc);
  if (!REQUIRED.every((k) => keys.includes(k)) || keys.some((k) => !REQUIRED.concat(OPTIONAL).includes(k))) {
    throw new ProofError("the proof document does not have the expected fields");
  }
  const logKey = base64Decode(doc.public_key, "public_key", 32);
  const entryKey = doc.entry_public_key ? base64Decode(doc.entry_public_key, "entry_public_key", 32) : null;
  if (trustedKeys) {
    if (!trustedKeys.includes(doc.public_key)) throw new ProofError("public_key is not the log's published key");
    if (entryKey && !trustedKeys.includes(doc.entry_public_key)) {
      throw new ProofError("entry_public_key is not one of the log's keys");
    }
  }

  // 1. checkpoint
  const checkpoint = parseCheckpoint(doc.checkpoint);
  if (origin && checkpoint.origin !== origin) {
    throw new ProofError(`checkpoint origin ${checkpoint.origin} is not the expected ${origin}`);
  }
  const keyHash = (await sha256(concat(encoder.encode(checkpoint.origin), Uint8Array.of(10, 1), logKey))).slice(0, 4);
  const matching = checkpoint.signatures.filter(
    (s) => s.name === checkpoint.origin && equal(s.raw.slice(0, 4), keyHash),
  );
  if (!matching.length) throw new ProofError("checkpoint carries no signature by public_key under its origin");
  for (const s of matching) {
    if (!(await ed25519Verify(logKey, checkpoint.body, s.raw.slice(4)))) {
      throw new ProofError("checkpoint signature does not verify");
    }
  }

  // 2. entry signature
  const entry = doc.entry;
  checkEntryShape(entry);
  let signer;
  if (entry.kid === hex((await sha256(logKey)).slice(0, 8))) signer = logKey;
  else if (entryKey && entry.kid === hex((await sha256(entryKey)).slice(0, 8))) signer = entryKey;
  else throw new ProofError(`entry was signed by key ${entry.kid}, which the document lacks`);
  const unsigned = Object.fromEntries(Object.entries(entry).filter(([k]) => k !== "sig"));
  const signature = base64Decode(entry.sig, "entry sig", 64);
  if (!(await ed25519Verify(signer, encoder.encode(canonicalJSON(unsigned)), signature))) {
    throw new ProofError("entry signature does not verify");
  }

  // 3. position
  if (!Number.isSafeInteger(doc.leaf_index)) throw new ProofError("leaf_index must be an integer");
  if (doc.leaf_index !== entry.seq) {
    throw new ProofError(`leaf_index ${doc.leaf_index} is not the entry's seq ${entry.seq}`);
  }

  // 4. inclusion
  if (!Array.isArray(doc.inclusion_proof) || doc.inclusion_proof.length > 64) {
    throw new ProofError("inclusion_proof must be a list of at most 64 hashes");
  }
  const proof = doc.inclusion_proof.map((p, i) => base64Decode(p, `inclusion_proof[${i}]`, 32));
  const leaf = await sha256(concat(Uint8Array.of(0), encoder.encode(canonicalJSON(entry))));
  const root = await rootFromInclusion(leaf, BigInt(doc.leaf_index), checkpoint.size, proof);
  if (!equal(root, checkpoint.root)) {
    throw new ProofError("inclusion proof does not lead to the checkpoint's root hash");
  }

  // 5. the resource version
  if (resource !== undefined) {
    const digest = hex(await sha256(encoder.encode(canonicalJSON(resource))));
    if (digest !== entry.resource_sha256) {
      throw new ProofError("the entry does not record this version of the consent (resource_sha256)");
    }
  }
  return {
    seq: entry.seq,
    event: entry.event,
    ref: entry.ref,
    ts: entry.ts,
    origin: checkpoint.origin,
    treeSize: Number(checkpoint.size),
    root: base64Encode(checkpoint.root),
    keyId: entry.kid,
  };
}
