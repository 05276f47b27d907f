// The graphical console page (/vms/NAME/display): noVNC (Debian's novnc package, served by
// Waymark under /static/novnc/) connected to the VM's screen through the API's WebSocket
// /api/vms/NAME/display (the session cookie signs it in; the server checks this page's Origin).
// Buttons as VMConnect has them: Ctrl+Alt+Del, Full screen, Clipboard > Type clipboard text.
import RFB from "/static/novnc/core/rfb.js";
import KeyTable from "/static/novnc/core/input/keysym.js";
import keysyms from "/static/novnc/core/input/keysymdef.js";

const root = document.getElementById("display");
const screen = document.getElementById("display-screen");
const status = document.getElementById("display-status");
const typed = document.getElementById("display-text");

function say(text) {
  status.textContent = text;
}

function address(vm) {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}/api/vms/${encodeURIComponent(vm)}/display`;
}

const rfb = new RFB(screen, address(root.dataset.vm), { wsProtocols: ["binary"] });
rfb.scaleViewport = true;
rfb.focusOnClick = true;
root.rfb = rfb; // (for the tests: the connection's state)

rfb.addEventListener("connect", () => {
  root.dataset.connected = "1";
  say("Connected. Click the screen to type into the VM.");
  rfb.focus();
});
rfb.addEventListener("disconnect", (event) => {
  root.dataset.connected = "0";
  say(event.detail.clean ? "Disconnected: the VM stopped, or the console was closed."
    : "The connection was refused or lost. Reload the page to connect again.");
});

// One key press (down and up) per character; a line break is Enter.
function typeText(text) {
  for (const char of text.replace(/\r\n?/g, "\n")) {
    const keysym = char === "\n" ? KeyTable.XK_Return : keysyms.lookup(char.codePointAt(0));
    if (keysym) {
      rfb.sendKey(keysym, null);
    }
  }
}

async function clipboardText() {
  if (typed.value) {
    return typed.value;
  }
  try {
    return await navigator.clipboard.readText();
  } catch (err) {
    say("The browser did not let the page read the clipboard: paste the text into the box, then press Type clipboard text again.");
    typed.focus();
    return "";
  }
}

document.getElementById("display-cad").addEventListener("click", () => {
  rfb.sendCtrlAltDel();
  rfb.focus();
});
document.getElementById("display-full").addEventListener("click", () => {
  if (document.fullscreenElement) {
    document.exitFullscreen();
  } else if (screen.requestFullscreen) {
    screen.requestFullscreen().then(() => rfb.focus(), () => say("Full screen was refused by the browser."));
  }
});
document.getElementById("display-type").addEventListener("click", async () => {
  const text = await clipboardText();
  if (text) {
    typeText(text);
    say(`Typed ${text.length} characters.`);
    rfb.focus();
  }
});
