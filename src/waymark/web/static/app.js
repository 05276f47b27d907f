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

// A refusal throws an Error with the server's message (and its ``hint``), shown in the page's
// notice unless ``quiet`` (a dialog that shows it itself).
async function api(method, path, body, quiet = false) {
  const options = { method, headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = data.error ? data.error.message : `HTTP ${response.status}`;
    if (!quiet) notice(message, true);
    throw Object.assign(new Error(message), { hint: data.error?.hint || "" });
  }
  return data;
}

// every path segment built here is encoded: a name never changes which URL a call goes to
const enc = encodeURIComponent;
const WORDS = { merge: "Merging", export: "Exporting", backup: "Backing up" };

// --- live job status (server-sent events) ----------------------------------------------------
// The stream is open while jobs run (the page says so when it is drawn, or it just started
// one); the server ends it once none is unfinished, so nothing is left hanging. Each job's
// news is also a "waymark:job" DOM event on the document (its detail: the job as the API
// shows it), and the stream's end one with the detail {idle: true}: other code waits for a
// job there. Asked to follow while an ended stream is still closing, it opens a new one then.
let source = null;
let sourceEnded = false;
let rejoin = false;

function followJobs() {
  if (source) {
    rejoin = rejoin || sourceEnded;
    return;
  }
  if (!csrf() || !window.EventSource) return;
  sourceEnded = false;
  source = new EventSource("/api/jobs/events?until_idle=true");
  document.body.dataset.streaming = "1";
  source.addEventListener("job", (event) => {
    const job = JSON.parse(event.data);
    document.dispatchEvent(new CustomEvent("waymark:job", { detail: job }));
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
  source.addEventListener("end", () => {
    sourceEnded = true;
    document.dispatchEvent(new CustomEvent("waymark:job", { detail: { idle: true } }));
  });
  source.addEventListener("revoked", () => { sourceEnded = true; });
  source.addEventListener("error", () => {
    if (!sourceEnded && source.readyState !== EventSource.CLOSED) return;
    source.close();
    source = null;
    document.body.dataset.streaming = "0";
    if (rejoin) {
      rejoin = false;
      followJobs();
    }
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
      openMenu(item, rowPoint(item));
    } else return;
    event.preventDefault();
  });
  tree.addEventListener("contextmenu", (event) => {
    const item = event.target.closest('[role="treeitem"][data-ckpt]');
    if (!item) return;
    event.preventDefault();
    openMenu(item, { left: event.clientX, top: event.clientY });
  });
  // delegated (not one listener a button): the tree's items are redrawn after a delete
  tree.addEventListener("click", (event) => {
    const button = event.target.closest(".menu-button");
    if (!button) return;
    event.stopPropagation();
    const box = button.getBoundingClientRect();
    openMenu(button.closest('[role="treeitem"]'), { left: box.right, top: box.top + box.height / 2 });
  });
}

// The point a menu opens at for a checkpoint chosen by keyboard: inside its own row (the item
// also holds its subtree, whose box may reach far below), beside its label.
function rowPoint(item) {
  const row = item.querySelector(":scope > .row") || item;
  const label = row.querySelector(".label") || row;
  const box = row.getBoundingClientRect();
  return { left: label.getBoundingClientRect().left, top: box.top + box.height / 2 };
}

function setupMenu(menu, run) {
  let current = null;
  let returnTo = null;
  const entries = () => [...menu.querySelectorAll('[role="menuitem"]')];
  const close = () => {
    menu.hidden = true;
    if (returnTo) returnTo.focus();
  };
  // ``at``: the point (viewport coordinates) in the clicked row the menu's corner goes to; a
  // menu that would run off the bottom of the window opens upwards from there instead
  const open = (item, at) => {
    if (!entries().length || item.classList.contains("deleting")) return;
    current = item;
    returnTo = item;
    menu.hidden = false;
    const { height, width } = menu.getBoundingClientRect();
    const top = at.top + height > window.innerHeight ? Math.max(0, at.top - height) : at.top;
    const left = Math.min(at.left, Math.max(0, document.documentElement.clientWidth - width));
    menu.style.left = `${left + window.scrollX}px`;
    menu.style.top = `${top + window.scrollY}px`;
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
    current.focus();  // the checkpoint, not the hidden entry: a dialog gives the focus back to it
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

// One checkpoint as a dialog names it: its name, local time and own space.
function describe(item) {
  const when = item.querySelector(":scope > .row time");
  return `${item.dataset.name}${when ? ` (${when.textContent})` : ""}: ${human(item.dataset.bytes)}`;
}

// The words of the Delete dialogs: what goes, what stays, the space freed.
function deletion(item, subtree, tree) {
  const now = tree.querySelector('[role="treeitem"][data-now]');
  const nowBelow = subtree && item.contains(now);
  const parent = item.parentElement.closest("[data-ckpt]");
  const nowMoves = nowBelow ? `: it moves under "${parent ? parent.dataset.name : "the top of the tree"}"` : "";
  if (!subtree) {
    return {
      title: "Delete Checkpoint",
      message: [`Delete the checkpoint "${item.dataset.name}"? This frees about ${human(item.dataset.bytes)}.`,
                "Its children and Now stay: its disk layers are merged into them in the background."],
      items: [describe(item)],
      actions: [{ label: "Delete", value: "delete", danger: true }],
    };
  }
  const doomed = [item, ...item.querySelectorAll("[data-ckpt]")];
  return {
    title: "Delete Checkpoint Subtree",
    message: [`Delete "${item.dataset.name}" and every checkpoint below it? This removes ${doomed.length} `
              + `checkpoint${doomed.length === 1 ? "" : "s"} and frees about ${human(subtreeBytes(item))}; `
              + `Now stays${nowMoves}.`, "These checkpoints go:"],
    items: doomed.map(describe),
    actions: [{ label: "Delete Subtree", value: "delete", danger: true }],
  };
}

// A deleted checkpoint's row (with its subtree's, for a subtree) says "Deleting…" and offers no
// menu while its merge runs; its children and Now stay where they were until the tree is redrawn.
function markDeleting(item, subtree) {
  for (const doomed of subtree ? [item, ...item.querySelectorAll("[data-ckpt]")] : [item]) {
    doomed.classList.add("deleting");
    doomed.setAttribute("aria-disabled", "true");
    const row = doomed.querySelector(":scope > .row");
    row.querySelector(".menu-button")?.remove();
    const note = row.appendChild(document.createElement("span"));
    note.className = "deleting-note";
    note.textContent = "Deleting…";
  }
}

// Redraw the tree and the space chart from the server (the page as it is now), without a reload.
async function redrawCheckpoints(page, tree) {
  const response = await fetch(location.href, { credentials: "same-origin" });
  if (!response.ok) return;
  const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
  const newTree = fresh.querySelector('#vm [role="tree"]');
  if (newTree) {
    const focused = tree.contains(document.activeElement) ? document.activeElement : null;
    tree.innerHTML = newTree.innerHTML;
    // the same checkpoint if it is still there, else Now, takes the tree's tab stop (and the
    // focus, if the tree had it)
    const again = (focused && focused.dataset.ckpt
                   && tree.querySelector(`[data-ckpt="${CSS.escape(focused.dataset.ckpt)}"]`))
      || tree.querySelector("[data-now]") || tree.querySelector('[role="treeitem"]');
    if (again && focused) focusItem(tree, again);
    else if (again) again.tabIndex = 0;
  }
  const space = page.querySelector("section.space");
  const newSpace = fresh.querySelector("#vm section.space");
  if (space && newSpace) space.innerHTML = newSpace.innerHTML;
  bars();
  indents();
  localTimes(page);
  page.dataset.redrawn = String(Number(page.dataset.redrawn || 0) + 1);
}

// Call ``then`` once the job ``jobId`` ended (the job stream reports it, or ends: idle).
function whenJobEnds(jobId, then) {
  const finished = (event) => {
    const job = event.detail;
    if (job.idle || (job.id === jobId && !["queued", "running"].includes(job.status))) {
      document.removeEventListener("waymark:job", finished);
      then();
    }
  };
  document.addEventListener("waymark:job", finished);
  followJobs();
}

function vmPage() {
  const page = document.getElementById("vm");
  if (!page) return;
  const vm = enc(page.dataset.vm);
  const base = `/api/vms/${vm}/checkpoints`;
  const menu = document.getElementById("ckpt-menu");
  const tree = page.querySelector('[role="tree"]');
  const after = (message) => { notice(message, false); setTimeout(() => location.reload(), 300); };
  const actions = {
    async apply(item) {
      const now = tree.querySelector("[data-now]");
      const current = now.parentElement.closest("[data-ckpt]");
      const mode = await confirmAction({
        title: "Apply Checkpoint",
        message: `Do you want to apply the selected checkpoint "${item.dataset.name}"? The VM's `
                 + "current state will be lost unless you create a checkpoint first.",
        items: [`Now: the VM's current state${current ? `, changed since "${current.dataset.name}"` : ""}`
                + ` (${human(now.dataset.bytes || 0)} on its disks)`],
        actions: [
          ...(menu.dataset.checkpointFirst ? [{ label: "Create Checkpoint and Apply", value: "checkpoint_first" }] : []),
          { label: "Apply", value: "discard_current", danger: true },
        ],
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
      const answer = await confirmAction(deletion(item, subtree, tree));
      if (answer !== "delete") return;
      const done = await api("DELETE", `${base}/${enc(item.dataset.ckpt)}${subtree ? "?subtree=true" : ""}`);
      notice(`Deleted ${item.dataset.name}; merging in job ${done.job_id.slice(0, 12)}.`, false);
      markDeleting(item, subtree);
      whenJobEnds(done.job_id, () => redrawCheckpoints(page, tree)
        .catch(() => notice("The checkpoint tree could not be redrawn: reload the page.", true)));
    },
  };
  const open = setupMenu(menu, (act, item) => {
    const task = act === "delete-subtree" ? actions.delete(item, true) : actions[act](item);
    task.catch(() => {});
  });
  if (tree) setupTree(tree, open);  // the Checkpoint button's dialog: pages.js
}

// --- forms and buttons that call the API ------------------------------------------------------
// <form data-api-method="POST" data-api-path="/api/users"> sends its fields as JSON (numbers
// from number inputs, booleans from checkboxes, arrays from multiple selects and repeated
// checkboxes, empty fields left out), then reloads the page (or goes to data-api-next).
// <button data-api-method="DELETE" data-api-path="..." data-confirm="..."> does one call (then
// reloads, or goes to data-api-next).
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

// A destructive form asks first (confirmAction): when it, or the option chosen in one of its
// selects, carries data-confirm (confirmFrom reads the words); data-api-preview="LABEL" sends it
// with dry_run: true first and lists the points its answer's "removed" names (a prune), then
// LABEL does it, for those points only. A button asks the same way when it carries
// data-confirm. The answer: null (cancelled), or what to add to the form's fields.
async function formConfirmed(form, method, path, body) {
  const asker = form.dataset.confirm !== undefined ? form
    : form.querySelector("option[data-confirm]:checked");
  if (asker) return (await confirmFrom(asker)) ? {} : null;
  if (!form.dataset.apiPreview) return {};
  const { removed } = await api(method, path, { ...body, dry_run: true });
  if (!removed.length) {
    notice("Nothing to prune: the keep rules keep every point.", false);
    return null;
  }
  const answer = await confirmAction({
    title: "Prune Backup Points",
    message: `These ${removed.length} backup point${removed.length === 1 ? "" : "s"} no keep rule keeps `
             + "will be removed (a later point that needs one keeps its data: it is merged in first):",
    items: removed.map((p) => `${p.vm_name}: ${p.kind} point of ${localTime(p.created_at)}, ${human(p.bytes)}`),
    actions: [{ label: form.dataset.apiPreview, value: "confirm", danger: true }],
  });
  return answer === "confirm" ? { points: removed.map((p) => p.id) } : null;
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
        const method = form.dataset.apiMethod || "POST";
        const confirmed = await formConfirmed(form, method, path, formBody(form));
        if (confirmed === null) {
          if (submit) submit.disabled = false;
          return;
        }
        const done = await api(method, path, { ...formBody(form), ...confirmed });
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
      if (button.dataset.confirm !== undefined && !(await confirmFrom(button))) return;
      button.disabled = true;
      try {
        await api(button.dataset.apiMethod || "POST", button.dataset.apiPath,
                  button.dataset.apiBody ? JSON.parse(button.dataset.apiBody) : undefined);
        setTimeout(() => { location.href = button.dataset.apiNext || location.href; }, 200);
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

// The space chart's rows are indented as the tree is (data-level; no style attributes either).
function indents() {
  for (const cell of document.querySelectorAll(".indent[data-level]")) {
    cell.style.paddingLeft = `${0.6 + 1.1 * (Number(cell.dataset.level) - 1)}rem`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  bars();
  indents();
  consolePage();
  apiForms();
  powerButtons();
  vmPage();
  if (document.body.dataset.jobsRunning === "1") followJobs();
});
