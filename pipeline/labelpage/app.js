"use strict";
// The labeling page. Every string that comes from the model (prompt, completions) is written with
// textContent, never innerHTML: completions are data, and "<script>" in one must show as text.

const $ = (id) => document.getElementById(id);
let labeler = localStorage.getItem("labeler") || "";
let item = null; // {id, prompt, completions, ended}
let ranks = []; // ranks[i]: the rank given to completion i, or null
let selected = 0; // the completion the number keys rank
let busy = false;

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  let data = {};
  try { data = await response.json(); } catch (e) { data = {error: `HTTP ${response.status}`}; }
  return {ok: response.ok, status: response.status, data};
}

function say(message, isError) {
  $("status").textContent = message || "";
  $("status").classList.toggle("error", Boolean(isError));
}

function showProgress(p) {
  if (!p) return;
  $("progress").textContent = `${p.done} / ${p.total} done` + (p.mine !== undefined ? ` (you: ${p.mine})` : "");
}

async function loadNext(message, isError) {
  const {ok, data} = await api(`/api/next?labeler=${encodeURIComponent(labeler)}`);
  if (!ok) { say(data.error, true); return; }
  showProgress(data.progress);
  item = data.item;
  $("work").hidden = item === null;
  $("finished").hidden = item !== null;
  if (item !== null) render();
  say(message, isError);
}

function render() {
  $("prompt").textContent = item.prompt;
  $("flag").value = "";
  const list = $("completions");
  list.replaceChildren();
  const k = item.completions.length;
  item.completions.forEach((text, i) => {
    const li = document.createElement("li");
    li.className = "completion";
    li.dataset.index = String(i);
    const head = document.createElement("div");
    head.className = "head";
    const letter = document.createElement("span");
    letter.className = "letter";
    letter.textContent = String.fromCharCode(65 + i);
    head.append(letter);
    if (!item.ended[i]) {
      const cut = document.createElement("span");
      cut.className = "cut";
      cut.textContent = "cut off: the model did not finish";
      head.append(cut);
    }
    const body = document.createElement("pre");
    body.className = "text";
    body.textContent = text;
    const buttons = document.createElement("div");
    buttons.className = "ranks";
    for (let r = 1; r <= k; r++) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "rank";
      b.textContent = String(r);
      b.setAttribute("aria-label", `rank ${r}`);
      b.addEventListener("click", (e) => { e.stopPropagation(); setRank(i, r); });
      buttons.append(b);
    }
    li.append(head, body, buttons);
    li.addEventListener("click", () => { selected = i; update(); });
    list.append(li);
  });
  ranks = new Array(k).fill(null);
  selected = 0;
  update();
}

function problem() {
  if (ranks.some((r) => r === null)) return "give every completion a rank";
  if (new Set(ranks).size === 1) return "all tied: no comparison (use Skip, or a flag and Flag & skip)";
  return "";
}

function update() {
  document.querySelectorAll(".completion").forEach((li, i) => {
    li.classList.toggle("selected", i === selected);
    li.querySelectorAll("button.rank").forEach((b, j) => b.setAttribute("aria-pressed", String(ranks[i] === j + 1)));
  });
  $("submit").disabled = busy || problem() !== "";
  $("skip").disabled = busy;
  $("skip").textContent = $("flag").value.trim() ? "Flag & skip" : "Skip";
}

function setRank(i, r) {
  ranks[i] = r;
  selected = Math.min(i + 1, ranks.length - 1);
  update();
  const p = problem();
  say(p && !p.startsWith("give") ? p : "");
}

async function send(path, extra) {
  if (busy || item === null) return;
  busy = true;
  update();
  try {
    const {ok, status, data} = await api(path, {labeler, id: item.id, flag: $("flag").value, ...extra});
    if (ok) await loadNext(path === "/api/submit" ? "Saved." : (data.flagged ? "Flagged and set aside." : "Skipped."));
    else if (status === 409 || status === 404) await loadNext(data.error, true);
    else say(data.error, true);
  } catch (e) {
    say(`not saved: ${e}`, true);
  } finally {
    busy = false;
    update();
  }
}

$("submit").addEventListener("click", () => send("/api/submit", {ranks}));
$("skip").addEventListener("click", () => send("/api/skip", {}));
$("flag").addEventListener("input", update);

$("who").addEventListener("submit", (e) => {
  e.preventDefault();
  labeler = $("labeler").value.trim();
  if (!labeler) return;
  localStorage.setItem("labeler", labeler);
  loadNext();
});

document.addEventListener("keydown", (e) => {
  if (item === null || e.target.matches("input, textarea") || e.ctrlKey || e.metaKey || e.altKey) return;
  const k = ranks.length;
  if (/^[1-9]$/.test(e.key) && Number(e.key) <= k) { setRank(selected, Number(e.key)); e.preventDefault(); }
  else if (e.key === "ArrowDown" || e.key === "j") { selected = Math.min(selected + 1, k - 1); update(); e.preventDefault(); }
  else if (e.key === "ArrowUp" || e.key === "k") { selected = Math.max(selected - 1, 0); update(); e.preventDefault(); }
  else if (e.key === "Enter" && !$("submit").disabled && e.target.tagName !== "BUTTON") { send("/api/submit", {ranks}); e.preventDefault(); }
});

$("labeler").value = labeler;
if (labeler) loadNext(); else $("labeler").focus();
