// Tollgate's operator console: a thin client of the admin API (/admin/*).
// Everything shown comes from the API and is inserted as text (textContent, attributes),
// never as HTML. The admin token lives in this tab's sessionStorage only.
"use strict";

const TOKEN_ITEM = "tollgate.adminToken";
const SPEND_DAYS = 7;
const CSV_FIELDS = [
  "request_id", "client_request_id", "ts", "key_id", "key_name", "model", "route", "path",
  "stream", "status", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd",
  "usage_source", "latency_ms", "ttft_ms", "upstream", "attempts",
];
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let current = null; // the record shown in the detail panel
let usage = { day: null, model: null };

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ---- the admin API ----------------------------------------------------------------------

async function api(method, path, body, token) {
  const headers = { authorization: "Bearer " + (token || sessionStorage.getItem(TOKEN_ITEM)) };
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit",
    });
  } catch (err) {
    throw new ApiError(0, "Tollgate did not answer (" + err.message + ")");
  }
  if (response.status === 401) {
    throw new ApiError(401, "The admin token was refused (401): check TOLLGATE_ADMIN_TOKEN.");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      const answer = await response.json();
      if (answer && answer.error && answer.error.message) message = answer.error.message;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(response.status, message);
  }
  return path.startsWith("/admin/usage/export") ? response.text() : response.json();
}

// ---- small DOM and formatting helpers ---------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) node.append(child); // strings become text nodes
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function usd(amount) {
  if (amount === null || amount === undefined) return "unlimited";
  const text = Math.abs(Number(amount)).toLocaleString("en-US",
    { minimumFractionDigits: 2, maximumFractionDigits: 6 });
  return (Number(amount) < 0 ? "-$" : "$") + text;
}

function count(n) {
  return n === null || n === undefined ? "unlimited" : Number(n).toLocaleString("en-US");
}

function metricText(metric, value) {
  return metric === "cost_usd" ? usd(value) : count(value);
}

function budgetText(record) {
  if (!record.budget) return "none";
  return usd(record.budget_spent) + " of " + usd(record.budget.amount) + " / " +
    record.budget.period;
}

function statusOf(record) {
  if (record.revoked) return "revoked";
  if (record.expires_at && Date.parse(record.expires_at) <= Date.now()) return "expired";
  return "active";
}

function utcDay(offsetDays) {
  const day = new Date();
  day.setUTCHours(0, 0, 0, 0);
  day.setUTCDate(day.getUTCDate() + offsetDays);
  return day.toISOString().slice(0, 10);
}

function say(message) {
  $("status").textContent = message;
  $("error").hidden = true;
}

function fail(err) {
  if (err instanceof ApiError && err.status === 401) {
    signOut("The admin token was refused (401): sign in again.");
    return;
  }
  $("error").textContent = err.message;
  $("error").hidden = false;
}

function download(filename, text, type) {
  const link = $("export-link");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([text], { type }));
  link.download = filename;
  link.textContent = "Download " + filename + " again";
  link.hidden = false;
  link.click();
}

function csv(rows, fields) {
  const cell = (value) => {
    const text = value === null || value === undefined ? "" :
      typeof value === "object" ? JSON.stringify(value) : String(value);
    return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  };
  return [fields.join(","), ...rows.map((row) => fields.map((f) => cell(row[f])).join(","))]
    .join("\r\n") + "\r\n";
}

function numberOrNull(form, name) {
  const raw = form.elements[name].value.trim();
  return raw === "" ? null : Number(raw);
}

function budgetOf(form) {
  const amount = numberOrNull(form, "budget_amount");
  return amount === null ? null : { amount, period: form.elements.budget_period.value };
}

// ---- signing in and out -----------------------------------------------------------------

function showLogin(message) {
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
  $("token").focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_ITEM);
  current = null;
  $("detail").hidden = true;
  $("secret-panel").hidden = true;
  $("secret-value").value = "";
  say("");
  showLogin(message);
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  try {
    const answer = await api("GET", "/admin/keys", undefined, token);
    sessionStorage.setItem(TOKEN_ITEM, token);
    $("token").value = "";
    $("login").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    say("Signed in.");
    showKeys(answer.data);
  } catch (err) {
    showLogin(err.status === 401
      ? "That admin token was refused. Use the value of TOLLGATE_ADMIN_TOKEN."
      : err.message);
  }
}

// ---- the key list -----------------------------------------------------------------------

async function loadKeys() {
  const answer = await api("GET", "/admin/keys");
  showKeys(answer.data);
}

function showKeys(records) {
  const body = $("keys-body");
  body.replaceChildren();
  const spendCells = [];
  for (const record of records) {
    const status = statusOf(record);
    const open = el("button", { type: "button", class: "link" }, record.name || record.id);
    open.addEventListener("click", () => openKey(record.id));
    const spend = el("td", { "data-label": "Spend, 7 days", class: "spend" }, "…");
    const row = el("tr", { "data-key-id": record.id, class: status },
      el("td", { "data-label": "Name" }, open),
      el("td", { "data-label": "Id" }, el("code", {}, record.id)),
      el("td", { "data-label": "Status" }, el("span", { class: "badge " + status }, status)),
      el("td", { "data-label": "RPM", class: "rpm" }, count(record.rpm)),
      el("td", { "data-label": "TPM", class: "tpm" }, count(record.tpm)),
      el("td", { "data-label": "Concurrency", class: "concurrency" },
        count(record.max_concurrency)),
      el("td", { "data-label": "Balance", class: "balance" }, usd(record.credits)),
      el("td", { "data-label": "Budget", class: "budget" }, budgetText(record)),
      spend);
    body.append(row);
    spendCells.push([record.id, spend]);
  }
  $("keys-empty").hidden = records.length > 0;
  fillSpend(spendCells);
}

async function fillSpend(spendCells) {
  // Whole UTC days, so the API answers from its per-day aggregates; a few at a time.
  const query = "?group_by=day&since=" + utcDay(1 - SPEND_DAYS) + "&until=" + utcDay(1);
  const queue = spendCells.slice();
  const worker = async () => {
    while (queue.length) {
      const [id, cell] = queue.shift();
      try {
        const answer = await api("GET", "/admin/keys/" + id + "/usage" + query);
        cell.textContent = usd(answer.totals.cost_usd);
        cell.dataset.costUsd = String(answer.totals.cost_usd);
      } catch (err) {
        cell.textContent = "?";
        cell.title = err.message;
      }
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
}

// ---- one key ----------------------------------------------------------------------------

function showSecret(record) {
  $("secret-name").textContent = record.name;
  $("secret-value").value = record.key;
  $("copy-state").textContent = "";
  $("secret-panel").hidden = false;
  $("secret-value").focus();
  $("secret-value").select();
}

async function copySecret() {
  const value = $("secret-value").value;
  try {
    await navigator.clipboard.writeText(value);
    $("copy-state").textContent = "Copied to the clipboard.";
  } catch (_) {
    $("secret-value").select();
    const copied = document.execCommand && document.execCommand("copy");
    $("copy-state").textContent = copied ? "Copied to the clipboard."
      : "The browser refused: select the secret and copy it by hand.";
  }
}

function fillEditForm(record) {
  const form = $("edit-form");
  form.elements.name.value = record.name;
  for (const field of ["rpm", "tpm", "max_concurrency"]) {
    form.elements[field].value = record[field] === null ? "" : String(record[field]);
  }
  form.elements.budget_amount.value = record.budget ? String(record.budget.amount) : "";
  form.elements.budget_period.value = record.budget ? record.budget.period : "month";
}

function showDetail(record) {
  current = record;
  const status = statusOf(record);
  $("detail").hidden = false;
  $("detail-name").textContent = record.name;
  $("detail-id").textContent = record.id;
  $("detail-status").textContent = status;
  $("detail-status").className = "badge " + status;
  $("detail-balance").textContent = usd(record.credits);
  $("detail-reserved").textContent = usd(record.reserved_credits);
  $("detail-budget").textContent = budgetText(record) +
    (record.budget_resets_at ? ", resets " + record.budget_resets_at : "");
  $("detail-grace").textContent = record.previous_secret_valid_until
    ? "The previous secret works until " + record.previous_secret_valid_until + "."
    : "Only the current secret works.";
  $("revoke").hidden = record.revoked;
  $("restore").hidden = !record.revoked;
  fillEditForm(record);
}

async function openKey(keyId) {
  try {
    showDetail(await api("GET", "/admin/keys/" + keyId));
    $("detail").scrollIntoView();
    await loadUsage();
  } catch (err) {
    fail(err);
  }
}

async function changed(record, message) {
  showDetail(record);
  await loadKeys();
  say(message);
}

async function act(work) {
  try {
    await work();
  } catch (err) {
    fail(err);
  }
}

// ---- usage charts -----------------------------------------------------------------------

async function loadUsage() {
  const id = current.id;
  const [day, model] = await Promise.all([
    api("GET", "/admin/keys/" + id + "/usage?group_by=day"),
    api("GET", "/admin/keys/" + id + "/usage?group_by=model"),
  ]);
  if (!current || current.id !== id) return;
  usage = { day, model };
  drawUsage();
}

function daysOf(answer) {
  // Every day of the window, so days without traffic show as gaps.
  const days = [];
  const end = Date.parse(answer.until);
  for (let t = Date.parse(answer.since); t < end && days.length < 400; t += 86400000) {
    days.push(new Date(t).toISOString().slice(0, 10));
  }
  const byDay = new Map(answer.groups.map((g) => [g.day, g]));
  return days.map((day) => byDay.get(day) || { day, requests: 0, total_tokens: 0, cost_usd: 0 });
}

function drawUsage() {
  const metric = $("metric").value;
  const totals = usage.day.totals;
  const box = $("usage");
  box.dataset.requests = totals.requests;
  box.dataset.totalTokens = totals.total_tokens;
  box.dataset.costUsd = totals.cost_usd;
  $("usage-totals").textContent = count(totals.requests) + " requests, " +
    count(totals.prompt_tokens) + " prompt and " + count(totals.completion_tokens) +
    " completion tokens, " + usd(totals.cost_usd);
  const days = daysOf(usage.day);
  $("chart-day").replaceChildren(columnChart(days.map((g) => [g.day, g[metric]]), metric));
  $("chart-model").replaceChildren(
    barChart(usage.model.groups.map((g) => [g.model, g[metric]]), metric));
}

function chartFrame(points, metric, width, height, kind) {
  const total = points.reduce((sum, [, value]) => sum + value, 0);
  return svg("svg", {
    viewBox: "0 0 " + width + " " + height, class: "chart", role: "img",
    "data-kind": kind, "data-metric": metric, "data-total": String(total),
    "aria-label": kind + " chart of " + metric + ", total " + metricText(metric, total),
  });
}

function columnChart(points, metric) {
  const width = 600, height = 220, left = 8, bottom = 24, top = 18;
  const chart = chartFrame(points, metric, width, height, "day");
  const max = Math.max(0, ...points.map(([, v]) => v));
  const step = (width - left * 2) / Math.max(points.length, 1);
  chart.append(svg("line", { x1: left, x2: width - left, y1: height - bottom,
    y2: height - bottom, class: "axis" }));
  chart.append(svg("text", { x: left, y: 12, class: "label" }, "max " + metricText(metric, max)));
  points.forEach(([label, value], i) => {
    const h = max > 0 ? (value / max) * (height - bottom - top) : 0;
    const bar = svg("rect", {
      x: (left + i * step + step * 0.15).toFixed(2), width: (step * 0.7).toFixed(2),
      y: (height - bottom - h).toFixed(2), height: h.toFixed(2), class: "bar",
      "data-label": label, "data-value": String(value),
    });
    bar.append(svg("title", {}, label + ": " + metricText(metric, value)));
    chart.append(bar);
  });
  if (points.length) {
    chart.append(svg("text", { x: left, y: height - 6, class: "label" }, points[0][0]));
    chart.append(svg("text", { x: width - left, y: height - 6, class: "label end" },
      points[points.length - 1][0]));
  }
  return chart;
}

function barChart(points, metric) {
  const width = 600, row = 28, left = 8, labelWidth = 200;
  const height = Math.max(row, points.length * row) + 8;
  const chart = chartFrame(points, metric, width, height, "model");
  if (!points.length) {
    chart.append(svg("text", { x: left, y: 20, class: "label" }, "No usage in this window."));
    return chart;
  }
  const max = Math.max(0, ...points.map(([, v]) => v));
  const room = width - labelWidth - left - 110;
  points.forEach(([label, value], i) => {
    const y = 4 + i * row;
    const w = max > 0 ? (value / max) * room : 0;
    chart.append(svg("text", { x: left, y: y + 18, class: "label" },
      label.length > 28 ? label.slice(0, 27) + "…" : label));
    const bar = svg("rect", { x: labelWidth, y: y + 4, width: w.toFixed(2), height: row - 10,
      class: "bar", "data-label": label, "data-value": String(value) });
    bar.append(svg("title", {}, label + ": " + metricText(metric, value)));
    chart.append(bar);
    chart.append(svg("text", { x: labelWidth + w + 6, y: y + 18, class: "label value" },
      metricText(metric, value)));
  });
  return chart;
}

function usageCsv() {
  const rows = [
    ...usage.day.groups.map((g) => ({ group_by: "day", group: g.day, ...g })),
    ...usage.model.groups.map((g) => ({ group_by: "model", group: g.model, ...g })),
  ];
  const fields = ["group_by", "group", "requests", "prompt_tokens", "completion_tokens",
    "total_tokens", "cost_usd"];
  download("tollgate-usage-" + current.id + ".csv", csv(rows, fields), "text/csv");
}

// ---- export -----------------------------------------------------------------------------

async function exportRecords(format) {
  const form = $("export-form");
  const since = form.elements.since.value, until = form.elements.until.value;
  $("export-state").textContent = "Exporting…";
  let text;
  try {
    text = await api("GET", "/admin/usage/export?since=" + encodeURIComponent(since) +
      "&until=" + encodeURIComponent(until));
  } catch (err) {
    $("export-state").textContent = "Export failed.";
    throw err;
  }
  const lines = text.split("\n").filter((line) => line);
  const name = "tollgate-usage-" + since + "-" + until;
  if (format === "csv") {
    download(name + ".csv", csv(lines.map((l) => JSON.parse(l)), CSV_FIELDS), "text/csv");
  } else {
    download(name + ".jsonl", text, "application/x-ndjson");
  }
  $("export-state").textContent = lines.length + " records exported.";
  $("export-state").dataset.records = String(lines.length);
}

// ---- wiring -----------------------------------------------------------------------------

function wire() {
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("refresh").addEventListener("click", () => act(async () => {
    await loadKeys();
    say("Keys refreshed.");
  }));
  $("copy-secret").addEventListener("click", copySecret);
  $("dismiss-secret").addEventListener("click", () => {
    $("secret-panel").hidden = true;
    $("secret-value").value = "";
  });
  $("close-detail").addEventListener("click", () => {
    current = null;
    $("detail").hidden = true;
  });
  $("create-form").addEventListener("submit", (event) => act(async () => {
    event.preventDefault();
    const form = event.target;
    const body = { name: form.elements.name.value };
    for (const field of ["rpm", "tpm", "max_concurrency", "credits"]) {
      const value = numberOrNull(form, field);
      if (value !== null) body[field] = value;
    }
    const budget = budgetOf(form);
    if (budget) body.budget = budget;
    const record = await api("POST", "/admin/keys", body);
    form.reset();
    showSecret(record);
    await loadKeys();
    say("Created key " + record.name + " (" + record.id + ").");
  }));
  $("edit-form").addEventListener("submit", (event) => act(async () => {
    event.preventDefault();
    const form = event.target;
    const body = {
      name: form.elements.name.value, rpm: numberOrNull(form, "rpm"),
      tpm: numberOrNull(form, "tpm"), max_concurrency: numberOrNull(form, "max_concurrency"),
      budget: budgetOf(form),
    };
    const record = await api("PATCH", "/admin/keys/" + current.id, body);
    await changed(record, "Saved the limits of " + record.name + ".");
  }));
  $("topup-form").addEventListener("submit", (event) => act(async () => {
    event.preventDefault();
    const amount = numberOrNull(event.target, "amount");
    const record = await api("POST", "/admin/keys/" + current.id + "/credits", { amount });
    event.target.reset();
    await changed(record, "Added " + usd(amount) + " to " + record.name + ".");
  }));
  $("revoke").addEventListener("click", () => act(async () => {
    const record = await api("DELETE", "/admin/keys/" + current.id);
    await changed(record, "Revoked " + record.name + ".");
  }));
  $("restore").addEventListener("click", () => act(async () => {
    const record = await api("POST", "/admin/keys/" + current.id + "/restore");
    await changed(record, "Restored " + record.name + ".");
  }));
  $("rotate-form").addEventListener("submit", (event) => act(async () => {
    event.preventDefault();
    const grace = numberOrNull(event.target, "grace_seconds") || 0;
    const record = await api("POST", "/admin/keys/" + current.id + "/rotate",
      { grace_seconds: grace });
    showSecret(record);
    delete record.key;
    await changed(record, "Rotated the secret of " + record.name + ".");
  }));
  $("metric").addEventListener("change", () => { if (usage.day) drawUsage(); });
  $("usage-csv").addEventListener("click", usageCsv);
  $("export-jsonl").addEventListener("click", () => act(() => exportRecords("jsonl")));
  $("export-csv").addEventListener("click", () => act(() => exportRecords("csv")));
  const form = $("export-form");
  form.elements.since.value = utcDay(-29);
  form.elements.until.value = utcDay(1);
}

async function start() {
  wire();
  if (!sessionStorage.getItem(TOKEN_ITEM)) {
    showLogin("");
    return;
  }
  try {
    await loadKeys();
    $("app").hidden = false;
    $("sign-out").hidden = false;
  } catch (err) {
    if (err.status === 401) signOut("The stored admin token was refused: sign in again.");
    else showLogin(err.message);
  }
}

document.addEventListener("DOMContentLoaded", start);
