// What the browser suites share: a real `brewmesh up` on port-0 addresses
// in a scratch directory, headless Chromium, and waiting for behaviour.

import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BIN = process.env.BREWMESH_BIN || "target/debug/brewmesh";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Generous: these bound a wait for behaviour, they do not measure it.
export const WAIT = 30_000;

export async function until(what, check, timeout = WAIT) {
  const end = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// `brewmesh up` with `args` besides the port-0 addresses, its registry
// token named after `label`; resolves once the ready file says where the
// gateway is. `stop()` ends it and removes its directory.
export async function startMesh(label, args) {
  const scratch = mkdtempSync(join(tmpdir(), `brewmesh-${label}-`));
  const ready = join(scratch, "ready.json");
  const mesh = spawn(BIN, [
    "up", "--data-dir", join(scratch, "data"), "--ready-file", ready,
    "--gateway-listen", "127.0.0.1:0", "--registry-listen", "127.0.0.1:0",
    "--payment-listen", "127.0.0.1:0", "--barista-listen", "127.0.0.1:0",
    // The page's token handling has a test of its own (page.test.mjs).
    ...(args.includes("--auth") ? args.filter((a) => a !== "--auth") : ["--no-auth", ...args]),
  ], {
    env: { ...process.env, BREWMESH_REGISTRY_TOKEN: `${label}-${process.pid}` },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  mesh.stderr.on("data", (chunk) => {
    log = (log + chunk).slice(-20_000);
  });
  mesh.on("exit", (code) => {
    if (code !== null && code !== 0) process.stderr.write(`brewmesh up exited ${code}\n${log}\n`);
  });
  const stop = async () => {
    if (mesh.exitCode === null) {
      mesh.kill("SIGTERM");
      await Promise.race([new Promise((r) => mesh.on("exit", r)), new Promise((r) => setTimeout(r, 20_000))]);
      if (mesh.exitCode === null) mesh.kill("SIGKILL");
    }
    rmSync(scratch, { recursive: true, force: true });
  };
  try {
    await until("the mesh's ready file", () => existsSync(ready) && readFileSync(ready, "utf8").length > 0, 60_000);
  } catch (error) {
    await stop();
    throw error;
  }
  const gateway = `http://${JSON.parse(readFileSync(ready, "utf8")).addr}`;
  return { mesh, gateway, scratch, stop };
}

// Headless Chromium as root on this machine.
export function launchChromium() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
}
