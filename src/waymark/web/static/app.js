// Waymark's portal: plain JavaScript, no build step. Every action calls the JSON API with the
// session's CSRF token; the server checks every permission again.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

function notice(text, isError) {
  const box = document.getElementById("notice");
  if (!box) return;
  box.textContent = text;
  box.className = isError ? "error" : "ok";
}

async function api(method, path, body) {
  const options = { method, headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = data.error ? data.error.message : `HTTP ${response.status}`;
    notice(message, true);
    throw new Error(message);
  }
  return data;
}

// every path segment built here is encoded: a name never changes which URL a call goes to
const enc = encodeURIComponent;
const WORDS = { merge: "Merging", export: "Exporting", backup: "Backing up" };

// --- live job status (server-sent events) ----------------------------------------------------
// The stream is open while jobs run (the page says so when it is drawn, or it just started
// one); the server ends it once none is unfinished, so nothing is left hanging.
let source = null;

function followJobs() {
  if (source || !csrf() || !window.EventSource) return;
  source = new EventSource("/api/jobs/events?until_idle=true");
  document.body.dataset.streaming = "1";
  source.addEventListener("job", (event) => {
    const job = JSON.parse(event.data);
    if (!job.vm_id) return;
    const word = WORDS[job.kind] || job.kind;
    const text = job.status === "running" || job.status === "queued"
      ? `${word} ${Math.floor(job.progress * 100)}%`
      : `${word} ${job.status}${job.status === "completed" ? " (100%)" : ""}`;
    document.querySelectorAll(`[data-vm-status="${job.vm_id}"]`).forEach((el) => {
      el.textContent = text;
      el.dataset.jobStatus = job.status;
      el.dataset.progress = job.progress;
    });
  });
  // After "end" the server closes the response; the browser then reports an error (and would
  // reconnect): only then is the stream closed here, so no request is cut short. "revoked"
  // (signed out, access removed) ends it too; after "expired" (the streams' lifetime) the
  // browser reconnects by itself, and gives up when that is refused (signed out meanwhile).
  let ended = false;
  source.addEventListener("end", () => { ended = true; });
  source.addEventListener("revoked", () => { ended = true; });
  source.addEventListener("error", () => {
    if (!ended && source.readyState !== EventSource.CLOSED) return;
    source.close();
    source = null;
    document.body.dataset.streaming = "0";
  });
}

// --- VM list: power buttons ------------------------------------------------------------------
function powerButtons() {
  document.querySelectorAll("button[data-power]").forEach((button) => {
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api("POST", `/api/vms/${enc(button.dataset.vmName)}/${enc(button.dataset.power)}`, {});
        location.reload();
      } catch (err) {
        button.disabled = false;
      }
    });
  });
}

// --- the checkpoint tree: keyboard navigation and menus --------------------------------------
function visibleItems(tree) {
  return [...tree.querySelectorAll('[role="treeitem"]')].filter((item) =>
    !item.parentElement.closest('[role="treeitem"][aria-expanded="false"]'));
}

function focusItem(tree, item) {
  tree.querySelectorAll('[role="treeitem"]').forEach((el) => { el.tabIndex = -1; });
  item.tabIndex = 0;
  item.focus();
}

function setupTree(tree, openMenu) {
  const items = visibleItems(tree);
  if (items.length) items[0].tabIndex = 0;
  tree.addEventListener("click", (event) => {
    const item = event.target.closest('[role="treeitem"]');
    if (item) focusItem(tree, item);
  });
  tree.addEventListener("keydown", (event) => {
    const item = event.target.closest('[role="treeitem"]');
    if (!item) return;
    const list = visibleItems(tree);
    const at = list.indexOf(item);
    const key = event.key;
    if (key === "ArrowDown" && at < list.length - 1) focusItem(tree, list[at + 1]);
    else if (key === "ArrowUp" && at > 0) focusItem(tree, list[at - 1]);
    else if (key === "Home") focusItem(tree, list[0]);
    else if (key === "End") focusItem(tree, list[list.length - 1]);
    else if (key === "ArrowRight" && item.getAttribute("aria-expanded") === "false") {
      item.setAttribute("aria-expanded", "true");
    } else if (key === "ArrowLeft" && item.getAttribute("aria-expanded") === "true") {
      item.setAttribute("aria-expanded", "false");
    } else if (key === "ArrowLeft") {
      const parent = item.parentElement.closest('[role="treeitem"]');
      if (parent) focusItem(tree, parent);
    } else if ((key === "Enter" || key === "ContextMenu" || (key === "F10" && event.shiftKey))
               && item.dataset.ckpt) {
      openMenu(item, item);
    } else return;
    event.preventDefault();
  });
  tree.addEventListener("contextmenu", (event) => {
    const item = event.target.closest('[role="treeitem"][data-ckpt]');
    if (!item) return;
    event.preventDefault();
    openMenu(item, item);
  });
  tree.querySelectorAll(".menu-button").forEach((button) => {
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      openMenu(button.closest('[role="treeitem"]'), button);
    });
  });
}

function setupMenu(menu, run) {
  let current = null;
  let returnTo = null;
  const entries = () => [...menu.querySelectorAll('[role="menuitem"]')];
  const close = () => {
    menu.hidden = true;
    if (returnTo) returnTo.focus();
  };
  const open = (item, anchor) => {
    if (!entries().length) return;
    current = item;
    returnTo = item;
    const box = anchor.getBoundingClientRect();
    menu.style.left = `${box.left + window.scrollX}px`;
    menu.style.top = `${box.bottom + window.scrollY}px`;
    menu.hidden = false;
    entries()[0].focus();
  };
  menu.addEventListener("keydown", (event) => {
    const list = entries();
    const at = list.indexOf(document.activeElement);
    if (event.key === "ArrowDown") list[(at + 1) % list.length].focus();
    else if (event.key === "ArrowUp") list[(at - 1 + list.length) % list.length].focus();
    else if (event.key === "Escape" || event.key === "Tab") close();
    else return;
    event.preventDefault();
  });
  menu.addEventListener("click", (event) => {
    const entry = event.target.closest('[role="menuitem"]');
    if (!entry) return;
    menu.hidden = true;
    run(entry.dataset.act, current);
  });
  document.addEventListener("click", (event) => {
    if (!menu.hidden && !menu.contains(event.target)) menu.hidden = true;
  });
  return open;
}

function ask(dialog, setup) {
  return new Promise((resolve) => {
    setup(dialog);
    const done = (value) => {
      dialog.close();
      resolve(value);
    };
    dialog.querySelectorAll("button").forEach((button) => {
      button.onclick = () => done(button.value);
    });
    dialog.oncancel = () => resolve("cancel");
    dialog.showModal();
    dialog.querySelector("input, select, button").focus();
  });
}

function human(bytes) {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

function subtreeBytes(item) {
  return [item, ...item.querySelectorAll("[data-ckpt]")]
    .reduce((sum, el) => sum + Number(el.dataset.bytes || 0), 0);
}

function vmPage() {
  const page = document.getElementById("vm");
  if (!page) return;
  const vm = enc(page.dataset.vm);
  const base = `/api/vms/${vm}/checkpoints`;
  const after = (message) => { notice(message, false); setTimeout(() => location.reload(), 300); };
  const actions = {
    async apply(item) {
      const mode = await ask(document.getElementById("apply-dialog"), (d) => {
        d.querySelector(".target").textContent = item.dataset.name;
      });
      if (mode === "cancel") return;
      await api("POST", `${base}/${enc(item.dataset.ckpt)}/apply`, { mode });
      after(`Applied ${item.dataset.name}.`);
    },
    async rename(item) {
      const input = document.getElementById("rename-input");
      const answer = await ask(document.getElementById("rename-dialog"), () => {
        input.value = item.dataset.name;
      });
      if (answer !== "rename") return;
      await api("PATCH", `${base}/${enc(item.dataset.ckpt)}`, { name: input.value });
      after(`Renamed to ${input.value}.`);
    },
    async export(item) {
      const select = document.getElementById("export-location");
      const answer = await ask(document.getElementById("export-dialog"), () => {});
      if (answer !== "export") return;
      const done = await api("POST", `${base}/${enc(item.dataset.ckpt)}/export`,
                             { location: select.value });
      notice(`Exporting into ${done.location}/${done.folder}.`, false);
      followJobs();
    },
    async delete(item, subtree) {
      const answer = await ask(document.getElementById("delete-dialog"), (d) => {
        d.querySelector(".target").textContent = item.dataset.name;
        d.querySelector(".subtree-note").textContent = subtree ? " and every checkpoint below it" : "";
        d.querySelector(".frees").textContent = human(subtree ? subtreeBytes(item) : item.dataset.bytes);
      });
      if (answer !== "delete") return;
      const done = await api("DELETE", `${base}/${enc(item.dataset.ckpt)}${subtree ? "?subtree=true" : ""}`);
      notice(`Deleted ${item.dataset.name}; merging in job ${done.job_id.slice(0, 12)}.`, false);
      item.remove();
      followJobs();
    },
  };
  const open = setupMenu(document.getElementById("ckpt-menu"), (act, item) => {
    const task = act === "delete-subtree" ? actions.delete(item, true) : actions[act](item);
    task.catch(() => {});
  });
  const tree = page.querySelector('[role="tree"]');
  if (tree) setupTree(tree, open);
  const take = document.getElementById("checkpoint");
  if (take) {
    take.addEventListener("click", async () => {
      take.disabled = true;
      try {
        const made = await api("POST", base, {});
        after(`Created checkpoint ${made.name}.`);
      } catch (err) {
        take.disabled = false;
      }
    });
  }
}

// --- forms and buttons that call the API ------------------------------------------------------
// <form data-api-method="POST" data-api-path="/api/users"> sends its fields as JSON (numbers
// from number inputs, booleans from checkboxes, arrays from multiple selects and repeated
// checkboxes, empty fields left out), then reloads the page (or goes to data-api-next).
// <button data-api-method="DELETE" data-api-path="..." data-confirm="..."> does one call.
function formBody(form) {
  const body = {};
  for (const el of form.elements) {
    if (!el.name || el.disabled || el.name.startsWith("_")) continue;
    if (el.type === "checkbox" && el.dataset.list !== undefined) {
      body[el.name] = body[el.name] || [];
      if (el.checked) body[el.name].push(el.value);
    } else if (el.type === "checkbox") body[el.name] = el.checked;
    else if (el.multiple) body[el.name] = [...el.selectedOptions].map((o) => o.value);
    else if (el.value === "") continue;
    else if (el.dataset.listText !== undefined) body[el.name] = [el.value];
    else if (el.type === "number") body[el.name] = Number(el.value);
    else body[el.name] = el.value;
  }
  return body;
}

function apiForms() {
  document.querySelectorAll("form[data-api-path]").forEach((form) => {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const submit = form.querySelector('[type="submit"]');
      if (submit) submit.disabled = true;
      try {
        // "{_field}" in the path is the value of the form's field "_field" (not sent)
        const path = form.dataset.apiPath.replace(/\{(_\w+)\}/g,
          (_, name) => enc(form.elements[name].value));
        const done = await api(form.dataset.apiMethod || "POST", path, formBody(form));
        if (form.dataset.apiShow) {
          notice(`${form.dataset.apiShow}: ${done[form.dataset.apiShowKey || "token"]}`, false);
          if (submit) submit.disabled = false;
          return;
        }
        if (form.dataset.apiFollow) followJobs();
        setTimeout(() => { location.href = form.dataset.apiNext || location.href; }, 200);
      } catch (err) {
        if (submit) submit.disabled = false;
      }
    });
  });
  document.querySelectorAll("button[data-api-path]").forEach((button) => {
    button.addEventListener("click", async () => {
      if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
      button.disabled = true;
      try {
        await api(button.dataset.apiMethod || "POST", button.dataset.apiPath,
                  button.dataset.apiBody ? JSON.parse(button.dataset.apiBody) : undefined);
        setTimeout(() => location.reload(), 200);
      } catch (err) {
        button.disabled = false;
      }
    });
  });
}

// --- the serial console: output streamed, lines typed -----------------------------------------
// Each output stream ends by itself after a quiet moment (and says where it stopped); while
// "Follow" is on, the page asks again from there.
function consolePage() {
  const page = document.getElementById("console");
  if (!page) return;
  const vm = enc(page.dataset.vm);
  const out = document.getElementById("console-output");
  const follow = document.getElementById("console-follow");
  let offset = null;
  let open = false;
  const connect = () => {
    if (open) return;
    open = true;
    document.body.dataset.streaming = "1";
    const stream = new EventSource(`/api/vms/${vm}/console/events${offset === null ? "" : `?offset=${offset}`}`);
    let ended = false;
    stream.addEventListener("output", (event) => {
      const data = JSON.parse(event.data);
      out.textContent += data.text;
      offset = data.offset;
      out.scrollTop = out.scrollHeight;
    });
    stream.addEventListener("end", (event) => {
      ended = true;
      offset = JSON.parse(event.data).offset;
    });
    stream.addEventListener("revoked", (event) => {  // signed out, or access removed
      ended = true;
      follow.checked = false;
      notice(JSON.parse(event.data).message, true);
    });
    stream.addEventListener("error", () => {
      if (!ended) return;
      stream.close();
      open = false;
      document.body.dataset.streaming = "0";
      if (follow.checked) setTimeout(connect, 300);
    });
  };
  follow.addEventListener("change", () => { if (follow.checked) connect(); });
  document.getElementById("console-input").addEventListener("submit", async (event) => {
    event.preventDefault();
    const line = document.getElementById("console-line");
    await api("POST", `/api/vms/${vm}/console/input`, { text: `${line.value}\n` }).catch(() => {});
    line.value = "";
    connect();
  });
  connect();
}

// Bars carry their width as data (the Content-Security-Policy allows no style attributes).
function bars() {
  for (const bar of document.querySelectorAll(".bar[data-width]")) {
    bar.style.width = `${bar.dataset.width}%`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  bars();
  consolePage();
  apiForms();
  powerButtons();
  vmPage();
  if (document.body.dataset.jobsRunning === "1") followJobs();
});
