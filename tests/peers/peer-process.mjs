// Starts a peer (oidc.mjs, azure.mjs, dataverse.mjs) as a child process for the peers' own
// test suites: config JSON in an environment variable, ready when it prints its one JSON
// line on stdout, stopped with SIGTERM.
import { spawn } from 'node:child_process';
import { once } from 'node:events';

export async function spawnPeer(script, configVar, config, { env = {} } = {}) {
  const child = spawn(process.execPath, [script], {
    env: { ...process.env, ...env, [configVar]: JSON.stringify(config) },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
  child.stdout.setEncoding('utf8');
  const readyLine = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`peer not ready in 10 s; stderr:\n${stderr}`)), 10_000);
    child.stdout.on('data', (d) => {
      stdout += d;
      const nl = stdout.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(stdout.slice(0, nl));
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(Object.assign(new Error(`peer exited early (${code}); stderr:\n${stderr}`), { code, stderr }));
    });
  });
  return {
    child,
    readyLine,
    ready: JSON.parse(readyLine),
    stdoutAfterReady: () => stdout.slice(readyLine.length + 1),
    stderr: () => stderr,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.kill('SIGTERM');
      await exited;
    },
  };
}
