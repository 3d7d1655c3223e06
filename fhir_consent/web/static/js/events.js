// Live updates: a Server-Sent Events reader over fetch(), so the access token travels in the
// Authorization header (EventSource cannot send headers, and tokens in URLs end up in logs).
// Parses the WHATWG event-stream format, resumes with Last-Event-ID, and reconnects with
// backoff. Stream: GET {fhirBase}/$events (see fhir_consent/web/events.py).

/** Split an event-stream text buffer into complete messages; returns [messages, rest]. */
export function parseEvents(buffer) {
  const messages = [];
  const blocks = buffer.replace(/\r\n?/g, "\n").split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    const message = { event: "message", data: [], id: null, retry: null };
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") message.event = value;
      else if (field === "data") message.data.push(value);
      else if (field === "id") message.id = value;
      else if (field === "retry" && /^\d+$/.test(value)) message.retry = Number(value);
    }
    // a block without data lines (a comment, a bare id) is not dispatched (WHATWG HTML)
    if (message.data.length) messages.push({ ...message, data: message.data.join("\n") });
    else if (message.id !== null) messages.push({ ...message, event: null, data: "" });
  }
  return [messages, rest];
}

/**
 * Connect to the stream. `onEvent(type, data)` gets each event with its parsed JSON data;
 * `onState(state)` gets "connecting", "live", "reconnecting" or "closed" (token refused).
 * Returns { close() }.
 */
export function connect({ url, token, onEvent, onState = () => {} }) {
  let lastId = null;
  let closed = false;
  let controller = null;
  let base = 1000; // the server's `retry`, else 1 s
  let delay = base;

  async function once() {
    controller = new AbortController();
    const headers = { Authorization: `Bearer ${token}`, Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    const response = await fetch(url, { headers, signal: controller.signal, cache: "no-store" });
    if (response.status === 401 || response.status === 403) return "refused";
    if (!response.ok || !response.body) return "retry";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return "retry";
      let messages;
      [messages, buffer] = parseEvents(buffer + value);
      for (const message of messages) {
        if (message.id !== null) lastId = message.id;
        if (message.retry !== null) base = delay = message.retry;
        if (message.event === null) continue; // only the id moved
        if (message.event === "error") return "refused";
        let data = null;
        try {
          data = message.data ? JSON.parse(message.data) : null;
        } catch {
          continue;
        }
        if (message.event === "ready") {
          if (lastId === null && data && data.cursor !== undefined) lastId = String(data.cursor);
          delay = base;
          onState("live");
        }
        onEvent(message.event, data);
      }
    }
  }

  async function run() {
    while (!closed) {
      onState(lastId === null ? "connecting" : "reconnecting");
      let outcome;
      try {
        outcome = await once();
      } catch {
        outcome = "retry";
      }
      if (closed) return;
      if (outcome === "refused") {
        closed = true;
        onState("closed");
        return;
      }
      onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }

  run();
  return {
    close() {
      closed = true;
      if (controller) controller.abort();
    },
  };
}
