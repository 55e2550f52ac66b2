// The API reference: every operation of /openapi.json with its parameters, request body and responses.
"use strict";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function describeOperation(path, method, op) {
  const section = element("section", undefined, "endpoint");
  section.appendChild(element("h2", `${method.toUpperCase()} ${path}`));
  if (op.summary) section.appendChild(element("p", op.summary));
  if (op.description && op.description !== op.summary) section.appendChild(element("p", op.description));
  const params = op.parameters || [];
  if (params.length) {
    const list = element("ul");
    for (const p of params) {
      const type = (p.schema && (p.schema.type || (p.schema.anyOf || []).map(s => s.type).join(" | "))) || "";
      list.appendChild(element("li", `${p.name} (${p.in}${p.required ? ", required" : ""}${type ? ", " + type : ""})`));
    }
    section.appendChild(element("h3", "Parameters"));
    section.appendChild(list);
  }
  if (op.requestBody) {
    section.appendChild(element("h3", "Request body"));
    section.appendChild(element("p", Object.keys(op.requestBody.content || {}).join(", ")));
  }
  const codes = Object.entries(op.responses || {}).map(([code, r]) => `${code} ${r.description || ""}`);
  if (codes.length) {
    section.appendChild(element("h3", "Responses"));
    section.appendChild(element("p", codes.join(" · ")));
  }
  return section;
}

async function render() {
  const target = document.getElementById("endpoints");
  try {
    const spec = await (await fetch("/openapi.json")).json();
    target.textContent = "";
    for (const [path, operations] of Object.entries(spec.paths || {})) {
      for (const [method, op] of Object.entries(operations)) target.appendChild(describeOperation(path, method, op));
    }
  } catch (err) {
    target.textContent = `could not read /openapi.json: ${err}`;
  }
}

render();
