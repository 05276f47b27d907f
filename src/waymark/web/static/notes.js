// A checkpoint's notes on the VM page (Hyper-V's Notes): the checkpoint menu's "Edit Notes…"
// opens a dialog with its notes as the server has them; Save sends them (PATCH of the
// checkpoint, which checks them: printable text, line breaks and tabs, at most 4,000
// characters), then shows their first line under the checkpoint's name. Plain JavaScript, no
// build step; notes are only ever set as text (textContent, value, title), never as HTML.
"use strict";

(() => {
  const page = document.getElementById("vm");
  const menu = document.getElementById("ckpt-menu");
  const dialog = document.getElementById("notes-dialog");
  const tree = page && page.querySelector('[role="tree"]');
  if (!page || !menu || !dialog || !tree) return;
  const input = document.getElementById("notes-input");
  const count = document.getElementById("notes-count");
  const problem = document.getElementById("notes-error");
  const base = `/api/vms/${encodeURIComponent(page.dataset.vm)}/checkpoints`;
  // api() and notice() are app.js's (loaded before this file)

  // The checkpoint the menu was opened for: the tree item last clicked, right-clicked or
  // keyed on (seen before the tree's own handlers, which open the menu).
  let target = null;
  const remember = (event) => {
    const item = event.target.closest('[role="treeitem"][data-ckpt]');
    if (item) target = item;
  };
  for (const kind of ["click", "contextmenu", "keydown"]) tree.addEventListener(kind, remember, true);

  function showFirstLine(item, notes) {
    let line = [...item.children].find((el) => el.classList.contains("notes"));
    if (!notes) {
      if (line) line.remove();
      return;
    }
    if (!line) {
      line = document.createElement("span");
      line.className = "notes";
      const row = [...item.children].find((el) => el.classList.contains("row"));
      if (row) row.after(line);
      else item.prepend(line);
    }
    const lines = notes.split("\n");
    line.textContent = lines[0] + (lines.length > 1 ? " …" : "");
    line.title = notes;
  }

  const counted = () => { count.textContent = `${input.value.length} / 4000 characters`; };
  input.addEventListener("input", counted);

  function ask(item, notes) {
    return new Promise((resolve) => {
      dialog.querySelector(".target").textContent = item.dataset.name;
      input.value = notes || "";
      problem.hidden = true;
      counted();
      const save = async () => {
        try {
          const done = await api("PATCH", `${base}/${encodeURIComponent(item.dataset.ckpt)}`,
                                 { notes: input.value }, true);
          dialog.close();
          resolve(done);
        } catch (err) {  // the dialog stays open: the user fixes what the server names
          problem.textContent = [err.message, err.hint].filter(Boolean).join(" ");
          problem.hidden = false;
          input.focus();
        }
      };
      dialog.querySelector('button[value="save"]').onclick = save;
      dialog.querySelector('button[value="cancel"]').onclick = () => { dialog.close(); resolve(null); };
      input.onkeydown = (event) => {
        if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
          event.preventDefault();
          save();
        }
      };
      dialog.oncancel = () => resolve(null);
      dialog.showModal();
      input.focus();
    });
  }

  async function edit(item) {
    const shown = await api("GET", `${base}/${encodeURIComponent(item.dataset.ckpt)}`);
    const done = await ask(item, shown.notes);
    item.focus();
    if (!done) return;
    showFirstLine(item, done.notes);
    notice(done.notes ? `Saved the notes of ${done.name}.` : `Cleared the notes of ${done.name}.`, false);
  }

  // "Edit Notes…" is handled here, before the menu's own click handler (which knows the
  // other actions only).
  menu.addEventListener("click", (event) => {
    const entry = event.target.closest('[role="menuitem"][data-act="notes"]');
    if (!entry || !target) return;
    event.stopPropagation();
    menu.hidden = true;
    edit(target).catch((err) => notice(err.message, true));
  }, true);
})();
