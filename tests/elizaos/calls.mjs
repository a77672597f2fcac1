// Makes calls through @elizaos/api-client's own classes, for tests/test_elizaos.py.
//
// Reads a JSON list of calls from standard input, each
//   {"baseUrl": ..., "apiKey": ... or null, "method": "getOrCreateDmChannel", "args": [...]}
// and makes them one after another, each with a new ElizaClient and its
// messaging service, as an application would. Prints a JSON list with, for each
// call, {"value": ...} (what the method resolved to) or {"error": {...}} (what
// it threw: its class, and an ApiError's code, message, details and status).
import { ApiError, ElizaClient } from "@elizaos/api-client";

let input = "";
for await (const chunk of process.stdin) input += chunk;

const results = [];
for (const call of JSON.parse(input)) {
  const client = ElizaClient.create({ baseUrl: call.baseUrl, apiKey: call.apiKey ?? undefined });
  try {
    results.push({ value: await client.messaging[call.method](...call.args) });
  } catch (error) {
    results.push({
      error: {
        isApiError: error instanceof ApiError,
        name: error.name,
        code: error.code,
        message: error.message,
        details: error.details,
        status: error.status,
      },
    });
  }
}
console.log(JSON.stringify(results));
