// Reproducing a column: the curl command and the openai-python call that repeat its request, and their Copy buttons.

import { apiKey } from "./api.js";
import { el } from "./dom.js";

/** A value on one line, as JSON (`{"a": [1, 2]}`) or as a Python literal (True, False, None). */
function literal(value, python = false) {
  if (value === null || value === undefined) return python ? "None" : "null";
  if (typeof value === "boolean") return python ? (value ? "True" : "False") : String(value);
  if (typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map((item) => literal(item, python)).join(", ")}]`;
  return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${literal(v, python)}`).join(", ")}}`;
}

/** A list, one item a line (messages). */
function listLiteral(items, python, indent) {
  return `[\n${items.map((item) => `${indent}    ${literal(item, python)},`).join("\n")}\n${indent}]`;
}

/** The request as a curl command; the key, if any, comes from $HPR_API_KEY. */
export function curlCommand(body) {
  const fields = Object.entries(body).map(([k, v]) => `  ${JSON.stringify(k)}: ${literal(v)}`);
  const json = `{\n${fields.join(",\n")}\n}`.replaceAll("'", "'\\''");
  const auth = apiKey() ? `  -H "Authorization: Bearer $HPR_API_KEY" \\\n` : "";
  return `curl -s ${location.origin}/v1/chat/completions \\\n  -H 'Content-Type: application/json' \\\n${auth}  -d '${json}'`;
}

/** The request as an openai-python call; the key, if any, comes from $HPR_API_KEY. */
export function pythonCall(body) {
  const { model, messages, hpr, ...rest } = body;
  const args = [`model=${literal(model)}`, `messages=${listLiteral(messages, true, "    ")}`];
  for (const [name, value] of Object.entries(rest)) args.push(`${name}=${literal(value, true)}`);
  if (hpr) args.push(`extra_body={"hpr": ${literal(hpr, true)}}`);
  const key = apiKey() ? `os.environ["HPR_API_KEY"]` : `"unused"`;
  const lines = [
    ...(apiKey() ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(`${location.origin}/v1`)}, api_key=${key})`,
    "r = client.chat.completions.create(",
    ...args.map((arg) => `    ${arg},`),
    ")",
    "print(r.choices[0].message.content)",
  ];
  if (hpr) lines.push('print(r.choices[0].model_extra["hpr_stats"])');
  return lines.join("\n");
}

/** Copy `text` to the clipboard and say so on `button` for a moment. */
export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // plain http on a non-local host has no clipboard API: fall back to a selection
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}
