// The playground: one request per column, streamed at the same time from this server's
// OpenAI-compatible API (/v1/*), exactly as any client would call it. GET /playground/config
// gives the λ range; the API key stays in its input field, never in storage or cookies.
"use strict";

const $ = (id) => document.getElementById(id);
let config;            // {lam_range, default_lam, n_aligned, context_length, api_key_required}
let model = null;      // the id /v1/models reports, once the key (if any) lets us ask
let running = null;    // the AbortController of the streams in flight
let codeColumn = 0;    // the column whose λ the code snippets use

const isChat = () => $("request").elements.mode.value === "chat";
const columns = () => [...$("outputs").children];

function headers() {
  const key = $("api-key").value;
  return { "content-type": "application/json", ...(key && { authorization: `Bearer ${key}` }) };
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function fetchModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  model = (await response.json()).data[0].id;
  updateCode();
}

// A key of `aligndial serve --keys` may allow a narrower λ range and its own default: the
// sliders take them from GET /v1/policy once the key is entered.
async function fetchKeyPolicy() {
  const response = await fetch("/v1/policy", { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  const policy = await response.json();
  Object.assign(config, { lam_range: policy.lam_range, default_lam: policy.default_lam, key_name: policy.name });
  const [lo, hi] = config.lam_range;
  const defaults = [config.default_lam].flat();
  // A key with its own default moves the sliders there; otherwise λ values already set stay
  // (clamped into the key's range).
  for (const column of columns()) {
    column.querySelectorAll(".lams > *").forEach((lam, k) => {
      const value = policy.own_default ? defaults[k] : Math.min(hi, Math.max(lo, Number(lam.children[2].value)));
      for (const input of [lam.children[1], lam.children[2]]) Object.assign(input, { min: lo, max: hi, value });
    });
  }
  describeServer();
  updateCode();
}

function describeServer() {
  const [lo, hi] = config.lam_range;
  const who = config.key_name ? `key ${config.key_name}: ` : "";
  $("server-info").textContent = config.n_aligned === 0
    ? `A plain model (no λ) · context ${config.context_length} tokens`
    : `${who}λ from ${lo} to ${hi}, default ${json(config.default_lam)} · 0 = reference, 1 = aligned, above 1 extrapolates` +
      ` · context ${config.context_length} tokens`;
}

// --- λ columns ------------------------------------------------------------------------------

function addColumn() {
  const column = $("column-template").content.firstElementChild.cloneNode(true);
  const [lo, hi] = config.lam_range;
  const defaults = [config.default_lam].flat();
  for (let k = 0; k < config.n_aligned; k++) {
    const lam = $("lam-template").content.firstElementChild.cloneNode(true);
    const [label, range, number] = lam.children;
    for (const input of [range, number]) Object.assign(input, { min: lo, max: hi, value: defaults[k] });
    range.addEventListener("input", () => { number.value = range.value; updateCode(); });
    number.addEventListener("input", () => { range.value = number.value; updateCode(); });
    column.querySelector(".lams").append(lam);
  }
  if (config.n_aligned === 0) column.querySelector(".lams").textContent = "plain model: no λ";
  column.querySelector(".show-code").addEventListener("click", () => {
    codeColumn = columns().indexOf(column);
    updateCode();
    $("code").scrollIntoView({ behavior: "smooth" });
  });
  $("outputs").append(column);
}

// Labels name the column, so that each slider and button has a distinct accessible name.
function setColumns(n) {
  while (columns().length < n) addColumn();
  while (columns().length > n) columns().at(-1).remove();
  codeColumn = Math.min(codeColumn, n - 1);
  columns().forEach((column, i) => {
    column.querySelector(".show-code").setAttribute("aria-label", `Show the code of column ${i + 1}`);
    column.querySelectorAll(".lam").forEach((lam, k) => {
      const [label, range, number] = lam.children;
      label.textContent = (n > 1 ? `Column ${i + 1} · ` : "") + (config.n_aligned > 1 ? `λ${k + 1}` : "λ");
      label.id = `lam-label-${i}-${k}`;
      range.id = label.htmlFor = `lam-${i}-${k}`;
      number.setAttribute("aria-labelledby", label.id);
    });
  });
  $("outputs").style.setProperty("--columns", n);
  updateCode();
}

// λ of a column: a number, a list (one weight per aligned model), or null for a plain model.
function lamOf(column) {
  const weights = [...column.querySelectorAll(".lam input[type=number]")].map((input) => Number(input.value));
  return weights.length === 0 ? null : weights.length === 1 ? weights[0] : weights;
}

// --- requests -------------------------------------------------------------------------------

function requestBody(lam) {
  const body = model ? { model } : {};
  const prompt = $("prompt").value;
  if (isChat()) {
    const system = $("system").value;
    body.messages = [...(system ? [{ role: "system", content: system }] : []), { role: "user", content: prompt }];
  } else {
    body.prompt = prompt;
  }
  body.max_tokens = Number($("max-tokens").value);
  body.temperature = Number($("temperature").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (lam !== null) body.alignment_strength = lam;
  return body;
}

// The `data:` payloads of a server-sent event stream, parsed, up to `data: [DONE]`.
async function* sseEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const events = (buffer += value).split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// One column's stream. `return_token_ids` gives each chunk its tokens, so the count is exact
// even while a chunk's text is held back (an unfinished UTF-8 character or stop string).
async function runColumn(column, signal) {
  const chat = isChat();  // fixed for this stream, whatever the radio buttons say later
  const output = column.querySelector(".output");
  const [tokensEl, rateEl] = [column.querySelector(".tokens"), column.querySelector(".rate")];
  output.textContent = "";
  output.classList.remove("error");
  output.setAttribute("aria-busy", "true");
  tokensEl.textContent = "0";
  rateEl.textContent = "–";
  const start = performance.now();
  let tokens = 0;
  try {
    const path = chat ? "/v1/chat/completions" : "/v1/completions";
    const body = { ...requestBody(lamOf(column)), stream: true, return_token_ids: true };
    const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of sseEvents(response.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      output.append(chat ? choice.delta.content ?? "" : choice.text);
      tokens += choice.token_ids?.length ?? 0;
      tokensEl.textContent = tokens;
      rateEl.textContent = (tokens / ((performance.now() - start) / 1000)).toFixed(1);
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      output.classList.add("error");
      output.textContent = e.message;
    }
  } finally {
    output.setAttribute("aria-busy", "false");
  }
}

async function run() {
  running = new AbortController();
  $("run").textContent = "Stop";
  $("status").textContent = "Streaming…";
  const start = performance.now();
  try {
    await fetchModel();
    await Promise.all(columns().map((column) => runColumn(column, running.signal)));
    const seconds = ((performance.now() - start) / 1000).toFixed(1);
    $("status").textContent = running.signal.aborted ? "Stopped." : `Done in ${seconds} s.`;
  } catch (e) {
    $("status").textContent = e.message;
  } finally {
    running = null;
    $("run").textContent = "Run";
  }
}

// --- code snippets ----------------------------------------------------------------------------

// One-line JSON with a space after `,` and `:`. Without true/false/null it is a Python literal too.
const json = (value) => JSON.stringify(value, null, 1).replace(/,\n */g, ", ").replace(/\n */g, "");
const shellQuote = (text) => `'${text.replaceAll("'", `'\\''`)}'`;

function updateCode() {
  const column = columns()[codeColumn];
  if (!column) return;
  const lam = lamOf(column);
  const body = requestBody(lam);
  const base = `${location.origin}/v1`;
  const key = config.api_key_required;
  const which = columns().length > 1 ? `Column ${codeColumn + 1}'s call` : "The call";
  $("code-for").textContent = `${which}${lam === null ? "" : ` (λ = ${json(lam)})`}; the page sends it with ` +
    `"stream": true and reads the server-sent events as they arrive.`;
  $("curl-code").textContent = [
    `curl ${base}${isChat() ? "/chat/completions" : "/completions"}`,
    `  -H 'content-type: application/json'`,
    ...(key ? [`  -H "Authorization: Bearer $ALIGNDIAL_API_KEY"`] : []),
    `  -d ${shellQuote(json(body))}`,
  ].join(" \\\n");
  const args = [
    `model=${json(body.model ?? "MODEL")}`,
    isChat() ? `messages=${json(body.messages)}` : `prompt=${json(body.prompt)}`,
    `max_tokens=${body.max_tokens}`,
    `temperature=${body.temperature}`,
    ...("seed" in body ? [`seed=${body.seed}`] : []),
    ...(lam === null ? [] : [`extra_body={"alignment_strength": ${json(lam)}}`]),
  ];
  $("python-code").textContent = [
    ...(key ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${json(base)}, api_key=${key ? 'os.environ["ALIGNDIAL_API_KEY"]' : '"unused"'})`,
    `r = client.${isChat() ? "chat.completions" : "completions"}.create(`,
    ...args.map((arg) => `    ${arg},`),
    ")",
    `print(r.choices[0].${isChat() ? "message.content" : "text"})`,
  ].join("\n");
}

// Copy to the clipboard where the browser allows it (https or localhost); else select the text.
async function copy(pre) {
  try {
    await navigator.clipboard.writeText(pre.textContent);
    $("status").textContent = "Copied.";
  } catch {
    getSelection().selectAllChildren(pre);
    $("status").textContent = "Selected: press Ctrl+C to copy.";
  }
}

// --- start --------------------------------------------------------------------------------------

async function main() {
  config = await (await fetch("/playground/config")).json();
  describeServer();
  $("key-field").hidden = !config.api_key_required;
  $("max-tokens").max = config.context_length - 1;
  setColumns(1);

  $("request").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!running) run();
  });
  $("run").addEventListener("click", (event) => {  // Stop skips the form's validation
    if (running) {
      event.preventDefault();
      running.abort();
    }
  });
  $("request").addEventListener("input", updateCode);
  $("request").elements.mode.forEach((radio) => radio.addEventListener("change", () => {
    $("system-field").hidden = !isChat();
    updateCode();
  }));
  $("columns").addEventListener("change", () => setColumns(Number($("columns").value)));
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !running) $("request").requestSubmit();
  });
  $("api-key").addEventListener("change", () => Promise.all([fetchModel(), fetchKeyPolicy()])
    .catch((e) => { $("status").textContent = e.message; }));
  document.querySelectorAll("[data-copy]").forEach((button) =>
    button.addEventListener("click", () => copy($(button.dataset.copy))));
  if (!config.api_key_required) await fetchModel();
}

main().catch((e) => { $("server-info").textContent = `Could not start: ${e.message}`; });
