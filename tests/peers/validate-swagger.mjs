import SwaggerParser from '@apidevtools/swagger-parser';
for (const f of process.argv.slice(2)) {
  try { const api = await SwaggerParser.validate(f); console.log(`${f}: valid Swagger ${api.swagger}, ${Object.keys(api.paths).length} paths`); }
  catch (e) { console.error(`${f}: ${e.message}`); process.exitCode = 1; }
}
