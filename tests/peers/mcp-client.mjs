// An agent as the official MCP TypeScript SDK makes one, driven by tests/web/mcp.rs.
// Given only the server's URL (MCP_URL) and a token source (MCP_TOKEN), it discovers the
// authorization server from the 401 the way the SDK's auth flow does, then connects over
// Streamable HTTP, lists the tools and calls them (MCP_CALLS: a JSON array of
// [tool, arguments]). Prints one JSON object with what it saw.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { discoverOAuthProtectedResourceMetadata, extractWWWAuthenticateParams } from '@modelcontextprotocol/sdk/client/auth.js';
import { LATEST_PROTOCOL_VERSION } from '@modelcontextprotocol/sdk/types.js';

const url = new URL(process.env.MCP_URL);
const out = {};

// 1. Unauthenticated: the 401 names the resource metadata, which names the authorization server.
const bare = await fetch(url, {
  method: 'POST',
  headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream' },
  body: JSON.stringify({ jsonrpc: '2.0', id: 0, method: 'initialize', params: { protocolVersion: LATEST_PROTOCOL_VERSION, capabilities: {}, clientInfo: { name: 'probe', version: '0' } } }),
});
out.unauthenticated_status = bare.status;
const { resourceMetadataUrl } = extractWWWAuthenticateParams(bare);
out.resource_metadata_url = resourceMetadataUrl?.href ?? null;
const prm = await discoverOAuthProtectedResourceMetadata(url, { resourceMetadataUrl });
out.resource = prm.resource;
out.authorization_servers = prm.authorization_servers;

// 2. With a token from the token source: initialize, list, call.
const transport = new StreamableHTTPClientTransport(url, {
  requestInit: { headers: { Authorization: `Bearer ${process.env.MCP_TOKEN}` } },
});
const client = new Client({ name: 'dc-test-agent', version: '1.0.0' });
try {
  await client.connect(transport);
  out.server = client.getServerVersion();
  out.protocol_version = transport.protocolVersion ?? null;
  out.instructions = client.getInstructions() ?? null;
  out.tools = (await client.listTools()).tools.map((t) => t.name);
  out.calls = [];
  for (const [name, args] of JSON.parse(process.env.MCP_CALLS || '[]')) {
    try {
      out.calls.push(await client.callTool({ name, arguments: args }));
    } catch (e) {
      out.calls.push({ protocol_error: String(e.message || e) });
    }
  }
  await client.close();
} catch (e) {
  out.connect_error = String(e.message || e);
}
process.stdout.write(JSON.stringify(out));
