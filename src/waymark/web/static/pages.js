// Waymark's portal, the VM page's panes and dialogs: the tab strip (Summary, Checkpoints,
// Console, Backups, Settings), the Checkpoint dialog (name and type) and a checkpoint's
// read-only Settings. Plain JavaScript, no build step; uses api() and notice() of app.js.
"use strict";

// --- the tab strip (WAI-ARIA tabs: arrow keys, Home, End; automatic activation) -------------
// The chosen tab is kept for the session per page, so an action that reloads the page (Back up
// now, Save settings) comes back to its tab; #summary in the address picks a tab too.
function setupTabs(strip) {
  const tabs = [...strip.querySelectorAll('[role="tab"]')];
  const panels = [...document.querySelectorAll('[role="tabpanel"][data-tab]')];
  const key = `waymark-tab:${location.pathname}`;
  const select = (tab, focus) => {
    for (const other of tabs) {
      const chosen = other === tab;
      other.setAttribute("aria-selected", String(chosen));
      other.tabIndex = chosen ? 0 : -1;
    }
    for (const panel of panels) panel.hidden = panel.dataset.tab !== tab.dataset.tab;
    sessionStorage.setItem(key, tab.dataset.tab);
    if (focus) tab.focus();
  };
  strip.addEventListener("click", (event) => {
    const tab = event.target.closest('[role="tab"]');
    if (tab) select(tab, true);
  });
  strip.addEventListener("keydown", (event) => {
    const at = tabs.indexOf(document.activeElement);
    if (at < 0) return;
    const next = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (next === undefined) return;
    event.preventDefault();
    select(tabs[(next + tabs.length) % tabs.length], true);
  });
  const asked = location.hash.slice(1) || sessionStorage.getItem(key);
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  const first = tabs.find((t) => t.dataset.tab === asked)
    || tabs.find((t) => t.getAttribute("aria-selected") === "true") || tabs[0];
  select(first, false);
}

// --- dialogs ----------------------------------------------------------------------------------
function openDialog(dialog, focus) {
  return new Promise((resolve) => {
    const done = () => resolve(dialog.returnValue || "cancel");
    dialog.addEventListener("close", done, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    (focus || dialog.querySelector("input, select, button")).focus();
  });
}

// --- the Checkpoint button: a name and a type -------------------------------------------------
function setupTake(vmName) {
  const take = document.getElementById("take-checkpoint");
  const dialog = document.getElementById("take-dialog");
  if (!take || !dialog) return;
  const name = document.getElementById("take-name");
  const type = document.getElementById("take-type");
  take.addEventListener("click", async () => {
    name.value = "";
    type.value = "";
    if (await openDialog(dialog, name) !== "take") return;
    const body = {};
    if (name.value.trim()) body.name = name.value.trim();
    if (type.value) body.type = type.value;
    take.disabled = true;
    try {
      const made = await api("POST", `/api/vms/${encodeURIComponent(vmName)}/checkpoints`, body);
      notice(`Created checkpoint ${made.name} (${made.kind}).`, false);
      setTimeout(() => location.reload(), 300);
    } catch (err) {
      take.disabled = false;
    }
  });
}

// --- a checkpoint's Settings (read-only) ------------------------------------------------------
const FIRMWARE = { bios: "BIOS (SeaBIOS)", uefi: "UEFI (OVMF)", "uefi-secure": "UEFI with Secure Boot (OVMF)" };

function size(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

function fact(list, term, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = term;
  if (value instanceof Node) dd.append(value);
  else dd.textContent = value;
  list.append(dt, dd);
}

function moment(iso) {
  const time = document.createElement("time");
  time.dateTime = iso;
  time.textContent = iso;
  return time;
}

// "standard, taken as disk-only (the VM was off)": what was asked, what it is, what applying does
function checkpointType(ckpt) {
  const asked = ckpt.requested_type || ckpt.kind;
  const taken = asked === ckpt.kind ? asked : `${asked}, taken as ${ckpt.kind}`;
  const why = ckpt.fallback_reason ? ` (${ckpt.fallback_reason})` : "";
  const effect = ckpt.has_memory ? "holds memory: applying it resumes the VM"
    : "disks only: applying it leaves the VM off";
  return `${taken}${why}; ${effect}`;
}

function fillSettings(dialog, ckpt) {
  const hw = ckpt.configuration || {};
  dialog.querySelector(".target").textContent = ckpt.name;
  const list = dialog.querySelector("dl");
  list.replaceChildren();
  fact(list, "Taken", moment(ckpt.created_at));
  fact(list, "Type", checkpointType(ckpt));
  fact(list, "Memory", `${hw.memory_mib} MiB`);
  fact(list, "Processors", `${hw.cpus} virtual CPU${hw.cpus === 1 ? "" : "s"}`);
  fact(list, "CPU model", hw.cpu_model || "—");
  fact(list, "Firmware", FIRMWARE[hw.firmware] || hw.firmware || "—");
  fact(list, "TPM", hw.tpm ? "TPM 2.0" : "none");
  fact(list, "Boot order", (hw.boot_order || []).join(", ") || "—");
  fact(list, "DVD drive", ckpt.media_name || "empty");
  fact(list, "Network adapters", String((hw.nics || []).length));
  const rows = dialog.querySelector("tbody");
  rows.replaceChildren();
  for (const disk of ckpt.disks) {
    const row = document.createElement("tr");
    for (const text of [disk.disk_id, size(disk.virtual_size), size(disk.allocated_bytes), String(disk.chain_depth)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    rows.append(row);
  }
}

// The menu's "Settings…" is handled here, before app.js's menu sees the click; the checkpoint
// is the one whose menu was last opened (right click, its ⋮ button, or a key on its row).
function setupCheckpointSettings(vmName) {
  const menu = document.getElementById("ckpt-menu");
  const dialog = document.getElementById("ckpt-settings");
  const tree = document.querySelector('#vm [role="tree"]');
  if (!menu || !dialog || !tree) return;
  let item = null;
  const remember = (event) => {
    const found = event.target.closest && event.target.closest("[data-ckpt]");
    if (found) item = found;
  };
  for (const kind of ["contextmenu", "click", "keydown"]) tree.addEventListener(kind, remember, true);
  dialog.querySelector('button[value="close"]').addEventListener("click", () => dialog.close("close"));
  menu.addEventListener("click", async (event) => {
    const entry = event.target.closest('[role="menuitem"][data-act="settings"]');
    if (!entry || !item) return;
    event.stopImmediatePropagation();
    menu.hidden = true;
    const target = item;
    try {
      const ckpt = await api("GET", `/api/vms/${encodeURIComponent(vmName)}/checkpoints/${encodeURIComponent(target.dataset.ckpt)}`);
      fillSettings(dialog, ckpt);
    } catch (err) {
      return;
    }
    await openDialog(dialog, dialog.querySelector('button[value="close"]'));
    target.focus();
  }, true);
}

document.addEventListener("DOMContentLoaded", () => {
  const strip = document.getElementById("vm-tabs");
  if (strip) setupTabs(strip);
  const page = document.getElementById("vm");
  if (!page) return;
  setupTake(page.dataset.vm);
  setupCheckpointSettings(page.dataset.vm);
});
