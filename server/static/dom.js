// The two DOM shorthands every module of the playground uses.

/** The first element under `root` that matches `selector`. */
export const $ = (selector, root = document) => root.querySelector(selector);

/** A new element, with a class name and text when given. */
export const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};
