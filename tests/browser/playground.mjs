// Drives the playground page in headless Debian Chromium and prints one JSON summary line on stdout.
//
//   node playground.mjs URL SCREENSHOT.png '{"prompt": "...", "maxTokens": 24, "steps": 3, ...}'
//
// Options: prompt, mode, maxTokens, steps, entropyBound, seed, apiKey, timeoutMs.
// The page itself counts drafts (data-drafts); independently, a MutationObserver records what the canvas
// view really showed, so the test checks rendering and not just the page's own bookkeeping.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, screenshot, optionsJson = "{}"] = process.argv.slice(2);
const options = JSON.parse(optionsJson);
const timeout = options.timeoutMs ?? 60000;
const summary = { drafts: 0, observed: null, state: null, answer: "", status: "", summary: "", error: null,
                  pageErrors: [], screenshot };

// A fresh profile each run, removed afterwards: no state leaks between runs.
const profile = mkdtempSync(join(tmpdir(), "dgemma-playground-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1000, height: 820 },
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage"],
  });
  const page = context.pages()[0] ?? await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on("pageerror", (err) => summary.pageErrors.push(String(err)));
  await page.goto(url, { waitUntil: "load" });

  // Record every state the canvas view passes through. Several drafts handled in one task coalesce into
  // one callback, so this counts renders the browser saw, a lower bound on the drafts received.
  await page.evaluate(() => {
    const view = document.getElementById("canvas");
    const seen = { renders: new Set(), maxSpans: 0, accepted: false, pending: false };
    window.__seen = seen;
    new MutationObserver(() => {
      const spans = view.querySelectorAll(".row:last-child .tok");
      if (!spans.length) return;
      seen.renders.add(`${view.dataset.canvas}/${view.dataset.step}`);
      seen.maxSpans = Math.max(seen.maxSpans, spans.length);
      for (const span of view.querySelectorAll(".tok")) {
        seen.accepted ||= span.classList.contains("acc");
        seen.pending ||= span.classList.contains("pend");
      }
    }).observe(view, { childList: true, subtree: true });
  });

  const fill = async (selector, value) => { if (value !== undefined) await page.fill(selector, String(value)); };
  if (options.mode) await page.selectOption("#mode", options.mode);
  await fill("#prompt", options.prompt ?? "Hello there");
  await fill("#max-tokens", options.maxTokens);
  await fill("#steps", options.steps);
  await fill("#entropy-bound", options.entropyBound);
  await fill("#seed", options.seed);
  await fill("#api-key", options.apiKey);
  await page.click("#send");
  await page.waitForSelector('#app[data-state="done"], #app[data-state="error"]', { timeout });

  Object.assign(summary, await page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    const error = document.getElementById("error");
    const seen = window.__seen;
    return {
      state: document.getElementById("app").dataset.state,
      drafts: Number(document.getElementById("app").dataset.drafts),
      observed: { renders: seen.renders.size, maxSpans: seen.maxSpans, accepted: seen.accepted,
                  pending: seen.pending },
      // Every token must show something and stay one line high, whatever whitespace its piece holds.
      layout: [...document.querySelectorAll("#canvas .tok")].reduce((acc, span) => ({
        spans: acc.spans + 1, blank: acc.blank + (span.innerText.trim() === ""),
        maxHeight: Math.max(acc.maxHeight, span.getBoundingClientRect().height),
      }), { spans: 0, blank: 0, maxHeight: 0 }),
      answer: text("answer"), status: text("status"), summary: text("summary"),
      error: error.hidden ? null : error.textContent,
    };
  }));
  await page.screenshot({ path: screenshot, fullPage: true });
} catch (err) {
  summary.error = summary.error ?? `driver: ${err.message}`;
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(summary));
