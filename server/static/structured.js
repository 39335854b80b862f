// The JSON schema box: its text becomes the request's response_format, and the answer is checked for JSON.

/** The box's text as a `response_format`; null when empty. Throws a SyntaxError naming the problem when it is not
 * JSON (the column then sends nothing). */
export function responseFormat(text) {
  const trimmed = text.trim();
  if (trimmed === "") return null;
  let schema;
  try {
    schema = JSON.parse(trimmed);
  } catch (error) {
    throw new SyntaxError(`the JSON schema is not JSON: ${error.message}`);
  }
  return schema ? { type: "json_schema", json_schema: { name: "playground", schema, strict: true } } : null;
}

/** Say in `check` whether the answer parses as JSON (the schema itself is the server's to enforce). */
export function showJsonCheck(check, answer) {
  try {
    JSON.parse(answer);
    check.textContent = "✓ the answer parses as JSON";
    check.dataset.parses = "yes";
  } catch (error) {
    check.textContent = `✗ the answer does not parse as JSON: ${error.message}`;
    check.dataset.parses = "no";
  }
  check.hidden = false;
}
