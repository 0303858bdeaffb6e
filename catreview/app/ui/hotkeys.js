() => {
  // Review-tab keys (catreview/app/ui/review_tab.py runs this once on page load). Each key clicks
  // or focuses an element by its elem_id; keys never fire while typing in a field (Esc leaves it).
  if (window.__catreviewKeys) return;
  window.__catreviewKeys = true;
  const CLICK = {
    "1": "confirm-0", "2": "confirm-1", "3": "confirm-2",
    "Enter": "accept", "a": "accept", "A": "accept",
    "n": "not-a-cat", "N": "not-a-cat", "u": "unsure", "U": "unsure",
    " ": "skip", "ArrowLeft": "prev", "ArrowRight": "next", "Backspace": "undo",
  };
  const NOT_TEXT = new Set(["checkbox", "radio", "button", "submit", "reset", "range", "color", "file"]);
  const SEARCH = new Set(["o", "O", "x", "X", "/"]);
  const KEYS = [
    ["1 / 2 / 3", "confirm a stage-1 candidate"], ["Enter / A", "accept the fused top-1"],
    ["O / X", "other breed: focus the search"], ["N", "Not a cat"], ["U", "Unsure"],
    ["Space", "skip"], ["← / →", "previous / next"], ["Backspace", "undo your last decision"],
    ["/", "focus the breed search"], ["?", "show / hide this key map"], ["Esc", "leave a text field"],
  ];
  const style = document.createElement("style");
  style.textContent = [
    "#confirm-0::before{content:'1 · '}", "#confirm-1::before{content:'2 · '}",
    "#confirm-2::before{content:'3 · '}", "#accept::before{content:'Enter · '}",
    "#not-a-cat::before{content:'N · '}", "#unsure::before{content:'U · '}",
    "#skip::before{content:'Space · '}", "#undo::before{content:'⌫ · '}",
    "#prev::before{content:'← '}", "#next::after{content:' →'}",
    "#keymap{position:fixed;top:12%;left:50%;transform:translateX(-50%);z-index:1000;" +
      "background:var(--background-fill-primary,#fff);border:1px solid #888;border-radius:8px;" +
      "padding:16px 24px;box-shadow:0 4px 24px rgba(0,0,0,.3);font-size:15px}",
    "#keymap td{padding:2px 10px}", "#keymap[hidden]{display:none}",
    // compact prediction panels: photo, panels and every control fit 1366x768
    ".review-panel .confidence-set{margin-bottom:2px!important}",
    ".review-panel .text{line-height:1.25!important;font-size:13px}",
    "#keymap-line p{font-size:12px;line-height:1.3}", "#counter p, #why p{margin:0}",
  ].join("\n");
  document.head.appendChild(style);
  const keymap = document.createElement("div");
  keymap.id = "keymap";
  keymap.hidden = true;
  keymap.setAttribute("role", "dialog");
  keymap.innerHTML = "<b>Review keys</b><table>" +
    KEYS.map(([k, v]) => `<tr><td><kbd>${k}</kbd></td><td>${v}</td></tr>`).join("") + "</table>";
  document.body.appendChild(keymap);

  const byId = (id) => document.getElementById(id);
  const button = (id) => {
    const el = byId(id);
    if (!el) return null;
    return el.tagName === "BUTTON" ? el : el.querySelector("button");
  };
  const visible = (el) => !!el && el.offsetParent !== null;
  const typing = (el) => {
    if (!el || el === document.body) return false;
    const tag = el.tagName;
    if (tag === "INPUT") return !NOT_TEXT.has((el.type || "text").toLowerCase());
    return tag === "TEXTAREA" || tag === "SELECT" || el.isContentEditable;
  };
  const search = () => {
    const box = document.querySelector("#breed-pick input");
    if (!box) return;
    box.focus();
    box.select();
  };
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const target = e.target;
    if (typing(target)) {
      if (e.key === "Escape") target.blur();
      return;
    }
    if (!visible(byId("confirm-0"))) return; // another tab is open
    if (e.key === "Escape" && !keymap.hidden) { keymap.hidden = true; e.preventDefault(); return; }
    if (e.key === "?") { keymap.hidden = !keymap.hidden; e.preventDefault(); return; }
    if (SEARCH.has(e.key)) { e.preventDefault(); search(); return; }
    const id = CLICK[e.key];
    if (!id) return;
    e.preventDefault(); // Enter/Space never activate a focused button, Space never scrolls
    const b = button(id);
    if (b && !b.disabled) b.click();
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  }, true);
  // A clicked button does not keep the focus (so Enter cannot confirm the next photo blindly).
  document.addEventListener("click", (e) => {
    const b = e.target instanceof Element ? e.target.closest("button") : null;
    if (b && visible(byId("confirm-0"))) setTimeout(() => b.blur(), 0);
  }, true);
}
