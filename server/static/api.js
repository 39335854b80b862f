// This server's OpenAI-compatible /v1 API as the page uses it: the key, the two requests, errors, server-sent events.

import { $ } from "./dom.js";

/** The key typed into the page ("" for none); it only ever travels as a header. */
export function apiKey() {
  return $("#api-key").value.trim();
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** `GET /v1/models`: the response's promise. */
export function getModels() {
  return fetch("/v1/models", { headers: requestHeaders() });
}

/** `POST /v1/chat/completions`, streamed with usage: the response's promise. The request leaves before this returns,
 * so columns that call it in one task reach the server together. */
export function postChatStream(body, signal) {
  return fetch("/v1/chat/completions", {
    method: "POST",
    headers: requestHeaders(),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
}

/** The server's own words for a failed response: the OpenAI error envelope's message, with status and code. */
export async function errorText(response) {
  const body = await response.text();
  try {
    const error = JSON.parse(body).error;
    if (error && error.message) {
      const code = [error.code, error.param].filter(Boolean).join(", ");
      return `${response.status}${code ? ` (${code})` : ""}: ${error.message}`;
    }
  } catch {
    // not JSON: show the text as is
  }
  return `${response.status} ${response.statusText}${body ? `: ${body.slice(0, 300)}` : ""}`;
}

/** Yield the payload of every `data:` line of a server-sent event stream. */
export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line.startsWith("data:")) yield line.slice(5).trim();
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
