// hpr-serve A/B playground: one prompt, two or three columns streaming at once, each with its own HPR edit.
// Plain ES modules, no framework, no build step; they talk only to this server's OpenAI-compatible /v1 API.
// This one wires the page: the API key, the model list, the columns, the prompt.

import { errorText, getModels } from "./api.js";
import { Column } from "./column.js";
import { $ } from "./dom.js";

const KEY_STORAGE = "hpr-playground-api-key"; // sessionStorage: gone with the tab, never in a URL

const models = { base: null, adapters: [] }; // filled in place: every column holds this object
const columns = [];

function setStatus(text, bad = false) {
  const status = $("#server-status");
  status.textContent = text;
  status.classList.toggle("bad", bad);
}

async function loadModels() {
  setStatus("Loading models…");
  let response;
  try {
    response = await getModels();
  } catch (error) {
    setStatus(`Cannot reach the server: ${error.message}`, true);
    return;
  }
  if (!response.ok) {
    const hint = response.status === 401 ? " Enter the server's API key above." : "";
    setStatus(`/v1/models: ${await errorText(response)}${hint}`, true);
    return;
  }
  const cards = (await response.json()).data;
  models.base = cards.find((card) => !card.parent) ?? cards[0];
  models.adapters = cards.filter((card) => card.parent && card.hpr);
  const count = models.adapters.length;
  setStatus(`${models.base.id} · ${count} adapter${count === 1 ? "" : "s"} · context ${models.base.max_model_len}`);
  for (const column of columns) column.setModels();
}

function setColumnCount(count) {
  while (columns.length > count) columns.pop().root.remove();
  while (columns.length < count) {
    const column = new Column(columns.length, models);
    columns.push(column);
    $("#columns").append(column.root);
  }
  $("#columns").style.setProperty("--columns", String(count));
}

function send(event) {
  event.preventDefault();
  const user = $("#user").value.trim();
  if (!user) {
    $("#user").focus();
    return;
  }
  const messages = [];
  const system = $("#system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: user });
  const seed = Math.floor(Math.random() * 2 ** 31); // one seed for every column without its own: a fair A/B
  for (const column of columns) column.run(messages, seed);
}

function init() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  $("#key-form").addEventListener("submit", (event) => event.preventDefault()); // Enter: `change` applies it
  key.addEventListener("change", () => {
    if (key.value.trim()) sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    else sessionStorage.removeItem(KEY_STORAGE);
    loadModels();
  });
  $("#prompt-form").addEventListener("submit", send);
  $("#user").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#prompt-form").requestSubmit();
  });
  $("#stop-all").addEventListener("click", () => columns.forEach((column) => column.stop()));
  $("#column-count").addEventListener("change", (event) => setColumnCount(Number(event.target.value)));
  setColumnCount(Number($("#column-count").value));
  loadModels();
}

init();
