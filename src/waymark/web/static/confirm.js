// Waymark's one confirmation of a destructive action, and local times: plain JavaScript, no
// build step. Loaded on every page before app.js; both functions are globals other scripts call.
"use strict";

let confirmCount = 0;

/**
 * confirmAction(options) -> Promise<string>: ask before something is lost (Hyper-V's pattern).
 *
 * A modal <dialog> (showModal: focus stays inside it, Escape cancels) titled `title`, saying
 * `message` (a string, or a list of paragraphs), listing `items` (what is lost, one line each:
 * names, sizes), with one button per entry of `actions` and Cancel last. Focus starts on
 * Cancel, so Enter or Space alone never destroys anything; a `danger` action is red (CSS class
 * "danger"). It resolves to the chosen action's `value`, or "cancel" (Cancel, Escape). It does
 * nothing itself: the caller acts on the answer, and does exactly what the dialog named.
 *
 *   const answer = await confirmAction({
 *     title: "Remove user", message: "Remove the user ann? They are signed out.",
 *     items: ["2 grants", "API token build (wm_1a2b)"],
 *     actions: [{ label: "Remove", value: "remove", danger: true }],
 *   });
 *   if (answer !== "remove") return;
 *
 * options: { title: string, message: string | string[], items?: string[],
 *            actions: { label: string, value: string, danger?: boolean }[] }
 */
function confirmAction({ title, message, items = [], actions }) {
  confirmCount += 1;
  const id = `confirm-${confirmCount}`;
  const dialog = document.createElement("dialog");
  dialog.className = "confirm";
  dialog.setAttribute("aria-labelledby", `${id}-title`);
  dialog.setAttribute("aria-describedby", `${id}-text`);
  const heading = dialog.appendChild(document.createElement("h2"));
  heading.id = `${id}-title`;
  heading.textContent = title;
  const text = dialog.appendChild(document.createElement("div"));
  text.id = `${id}-text`;
  for (const paragraph of [].concat(message)) {
    text.appendChild(document.createElement("p")).textContent = paragraph;
  }
  if (items.length) {
    const list = text.appendChild(document.createElement("ul"));
    list.className = "lost";
    for (const item of items) list.appendChild(document.createElement("li")).textContent = item;
  }
  const row = dialog.appendChild(document.createElement("p"));
  row.className = "buttons";
  const button = (label, value, danger) => {
    const made = row.appendChild(document.createElement("button"));
    made.type = "button";
    made.textContent = label;
    made.value = value;
    if (danger) made.className = "danger";
    made.addEventListener("click", () => dialog.close(value));
    return made;
  };
  actions.forEach((action) => button(action.label, action.value, action.danger));
  const cancel = button("Cancel", "cancel", false);
  cancel.autofocus = true;
  document.body.appendChild(dialog);
  const before = document.activeElement;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      dialog.remove();
      if (before && before.isConnected && before !== document.body) before.focus();
      resolve(dialog.returnValue || "cancel");
    });
    dialog.showModal();
    cancel.focus();
  });
}

/**
 * confirmFrom(element) -> Promise<boolean>: confirmAction from an element's data attributes
 * (a button, a form or a select's option): data-confirm (the question), data-confirm-title
 * (default: the element's text), data-confirm-action (the red button's label; default: its
 * text), data-confirm-items (what is lost, one line each, separated by newlines). True when
 * the user chose the action. An ISO time in these words shows as local time (localTime).
 */
async function confirmFrom(element) {
  const data = element.dataset;
  const label = data.confirmAction || element.textContent.trim();
  const answer = await confirmAction({
    title: data.confirmTitle || label,
    message: localIn(data.confirm),
    items: localIn(data.confirmItems || "").split("\n").filter((line) => line.trim()),
    actions: [{ label, value: "confirm", danger: true }],
  });
  return answer === "confirm";
}

const LOCAL_TIME = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

/** localTime(iso) -> string: an ISO 8601 time as the browser's local date and time (the ISO
 * text itself when the browser cannot read it). */
function localTime(iso) {
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? iso : LOCAL_TIME.format(when);
}

const ISO_TIME = /\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)/g;

/** localIn(text) -> string: `text` with every ISO 8601 time in it as local time. */
function localIn(text) {
  return text.replace(ISO_TIME, localTime);
}

/**
 * localTimes(root = document): every <time datetime="ISO"> under `root` shows the browser's
 * local date and time (localTime); its ISO form (UTC, as stored) becomes its title, shown on
 * hover. Runs on every page at load; call it again for elements added later.
 */
function localTimes(root = document) {
  for (const element of root.querySelectorAll("time[datetime]")) {
    const iso = element.getAttribute("datetime");
    element.textContent = localTime(iso);
    element.title = iso;
  }
}

document.addEventListener("DOMContentLoaded", () => localTimes());
