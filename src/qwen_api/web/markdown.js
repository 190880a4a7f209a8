// A small Markdown renderer that builds DOM nodes and never parses HTML.
//
// Model output is untrusted: every piece of it reaches the page through createTextNode / textContent, so
// `<script>` or `<img onerror=...>` in an answer shows as those characters and nothing runs. It covers what
// chat models write: fenced code blocks, headings, lists, block quotes, tables, rules, paragraphs with line
// breaks, and inline code, bold, italic, strikethrough and http(s) links. Images are never loaded (shown as
// their text), and a link whose target is not http(s) stays text.
"use strict";

(() => {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEPARATOR = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;
  // One alternative per inline construct; the earliest match wins, its inner text is rendered recursively.
  const INLINE = new RegExp(
    [
      "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)", // 1, 2: code span
      "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*", // 3: strong
      "(?<![\\w])__(?=\\S)([\\s\\S]*?\\S)__(?![\\w])", // 4: strong
      "~~(?=\\S)([\\s\\S]*?\\S)~~", // 5: strikethrough
      "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*", // 6: emphasis
      "(?<![\\w])_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![\\w])", // 7: emphasis
      "(!?)\\[([^\\]\\n]+)\\]\\(([^()\\s]+)(?:\\s+\"[^\"\\n]*\")?\\)", // 8, 9, 10: image or link
    ].join("|"),
    "g",
  );

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function inline(parent, text) {
    INLINE.lastIndex = 0;
    let at = 0;
    for (let m = INLINE.exec(text); m !== null; m = INLINE.exec(text)) {
      if (m.index > at) parent.append(document.createTextNode(text.slice(at, m.index)));
      at = INLINE.lastIndex;
      if (m[1] !== undefined) {
        parent.append(el("code", "", m[2]));
      } else if (m[3] !== undefined || m[4] !== undefined) {
        const inner = el("strong");
        inline(inner, m[3] ?? m[4]);
        parent.append(inner);
      } else if (m[5] !== undefined) {
        const inner = el("del");
        inline(inner, m[5]);
        parent.append(inner);
      } else if (m[6] !== undefined || m[7] !== undefined) {
        const inner = el("em");
        inline(inner, m[6] ?? m[7]);
        parent.append(inner);
      } else {
        parent.append(linkOrText(m[8] === "!", m[9], m[10]));
      }
      INLINE.lastIndex = at; // the recursive calls above reuse the same expression
    }
    if (at < text.length) parent.append(document.createTextNode(text.slice(at)));
  }

  function linkOrText(isImage, label, target) {
    if (isImage || !/^https?:\/\//i.test(target)) {
      // Nothing is fetched on the model's say-so: an image (or a javascript:/data: link) is shown as text.
      return document.createTextNode(isImage ? `[image: ${label}] (${target})` : `${label} (${target})`);
    }
    const a = el("a");
    a.href = target;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    a.referrerPolicy = "no-referrer";
    a.title = target;
    inline(a, label);
    return a;
  }

  function lines(parent, textLines) {
    textLines.forEach((line, i) => {
      if (i > 0) parent.append(el("br"));
      inline(parent, line);
    });
  }

  /** The clipboard API exists only in secure contexts (https, localhost): a page opened over plain http from
   * another machine copies through a selected, off-screen text area instead. */
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    const area = el("textarea", "", text);
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.left = "-9999px";
    document.body.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    return copied ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }

  function codeBlock(code, lang, open) {
    const box = el("div", "code-block");
    const head = el("div", "code-head");
    head.append(el("span", "code-lang", lang || "code"));
    if (!open) {
      const copy = el("button", "copy", "Copy");
      copy.type = "button";
      copy.addEventListener("click", () => {
        copyText(code).then(
          () => (copy.textContent = "Copied"),
          () => (copy.textContent = "Copy failed"),
        );
      });
      head.append(copy);
    }
    const pre = el("pre");
    const codeEl = el("code", lang ? `language-${lang.replace(/[^\w-]/g, "")}` : "", code);
    pre.append(codeEl);
    box.append(head, pre);
    return box;
  }

  function splitRow(line) {
    let row = line.trim();
    if (row.startsWith("|")) row = row.slice(1);
    if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
    return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
  }

  function table(head, rows) {
    const wrap = el("div", "table-wrap");
    const t = el("table");
    const thead = el("thead");
    const tr = el("tr");
    for (const cell of splitRow(head)) {
      const th = el("th");
      inline(th, cell);
      tr.append(th);
    }
    thead.append(tr);
    const tbody = el("tbody");
    for (const line of rows) {
      const row = el("tr");
      for (const cell of splitRow(line)) {
        const td = el("td");
        inline(td, cell);
        row.append(td);
      }
      tbody.append(row);
    }
    t.append(thead, tbody);
    wrap.append(t);
    return wrap;
  }

  function lists(items) {
    // items: [{indent, ordered, start, text}]. Deeper indentation opens a list inside the previous item; a
    // change between bullets and numbers at the same depth starts a sibling list.
    const tops = [];
    const stack = [];
    for (const item of items) {
      while (stack.length && item.indent < stack[stack.length - 1].indent) stack.pop();
      let level = stack[stack.length - 1];
      if (!level || item.indent > level.indent || level.ordered !== item.ordered) {
        if (level && item.indent === level.indent) stack.pop();
        const outer = stack[stack.length - 1];
        const node = el(item.ordered ? "ol" : "ul");
        if (item.ordered && item.start !== 1) node.start = item.start;
        if (outer?.lastItem) outer.lastItem.append(node);
        else tops.push(node);
        level = { indent: item.indent, ordered: item.ordered, node, lastItem: null };
        stack.push(level);
      }
      const li = el("li");
      lines(li, item.text.split("\n"));
      level.node.append(li);
      level.lastItem = li;
    }
    return tops;
  }

  function isBlockStart(line, next) {
    return (
      FENCE.test(line) ||
      HEADING.test(line) ||
      RULE.test(line) ||
      QUOTE.test(line) ||
      ITEM.test(line) ||
      (line.includes("|") && next !== undefined && TABLE_SEPARATOR.test(next) && next.includes("-"))
    );
  }

  function blocks(parent, all) {
    let i = 0;
    while (i < all.length) {
      const line = all[i];
      const fence = line.match(FENCE);
      if (fence) {
        const marker = fence[1];
        const closing = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}\\s*$`);
        const body = [];
        i += 1;
        while (i < all.length && !closing.test(all[i])) body.push(all[i++]);
        const open = i >= all.length; // still streaming, or never closed
        i += 1;
        parent.append(codeBlock(body.join("\n"), fence[2], open));
        continue;
      }
      if (!line.trim()) {
        i += 1;
        continue;
      }
      const heading = line.match(HEADING);
      if (heading) {
        const h = el(`h${heading[1].length}`);
        inline(h, heading[2]);
        parent.append(h);
        i += 1;
        continue;
      }
      if (RULE.test(line)) {
        parent.append(el("hr"));
        i += 1;
        continue;
      }
      if (QUOTE.test(line)) {
        const quoted = [];
        while (i < all.length && QUOTE.test(all[i])) quoted.push(all[i++].match(QUOTE)[1]);
        const q = el("blockquote");
        blocks(q, quoted);
        parent.append(q);
        continue;
      }
      if (ITEM.test(line)) {
        const items = [];
        while (i < all.length) {
          const m = all[i].match(ITEM);
          if (m) {
            items.push({
              indent: m[1].replace(/\t/g, "    ").length,
              ordered: /\d/.test(m[2]),
              start: Number.parseInt(m[2], 10) || 1,
              text: m[3],
            });
          } else if (all[i].trim() && /^\s+/.test(all[i]) && items.length) {
            items[items.length - 1].text += `\n${all[i].trim()}`; // a wrapped item continues
          } else {
            break;
          }
          i += 1;
        }
        parent.append(...lists(items));
        continue;
      }
      if (line.includes("|") && i + 1 < all.length && TABLE_SEPARATOR.test(all[i + 1]) && all[i + 1].includes("-")) {
        const rows = [];
        let j = i + 2;
        while (j < all.length && all[j].includes("|") && all[j].trim()) rows.push(all[j++]);
        parent.append(table(line, rows));
        i = j;
        continue;
      }
      const paragraph = [line];
      i += 1;
      while (i < all.length && all[i].trim() && !isBlockStart(all[i], all[i + 1])) paragraph.push(all[i++]);
      const p = el("p");
      lines(p, paragraph);
      parent.append(p);
    }
  }

  /** Markdown text -> a DocumentFragment of elements built node by node (no HTML parsing anywhere). */
  function render(text) {
    const fragment = document.createDocumentFragment();
    blocks(fragment, String(text).replace(/\r\n?/g, "\n").split("\n"));
    return fragment;
  }

  window.QwenMarkdown = Object.freeze({ render });
})();
