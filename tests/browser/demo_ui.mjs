// Drive the web demo in headless Chromium (Debian's binary, through playwright-core; nothing is downloaded).
// Usage: node demo_ui.mjs URL IMAGE PROMPT OUT_DIR
// Uploads IMAGE, sends PROMPT, waits for the answer and the annotated image, then writes OUT_DIR/demo_ui.png
// (a screenshot) and OUT_DIR/annotated.png (the annotated image as served) and prints a JSON summary.
import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const [url, imagePath, prompt, outDir] = process.argv.slice(2);
if (!url || !imagePath || !prompt || !outDir) {
  console.error("usage: node demo_ui.mjs URL IMAGE PROMPT OUT_DIR");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  page.setDefaultTimeout(30000);
  const problems = [];
  page.on("pageerror", (err) => problems.push(String(err)));

  await page.goto(url, { waitUntil: "domcontentloaded" });
  const promptBox = page.locator("#prompt textarea");
  await promptBox.waitFor();

  await page.locator("#input-image input[type=file]").setInputFiles(imagePath);
  await page.locator("#input-image img").first().waitFor();
  await page.waitForTimeout(500); // let the upload's reset event finish before the first turn

  await promptBox.fill(prompt);
  await page.locator("#send").click();

  await page.locator("#annotated-image img").first().waitFor();
  await page.waitForFunction(() => (document.querySelector("#groundings textarea")?.value || "").includes("box ("));
  const chat = await page.locator("#chatbot").innerText();
  const coords = await page.locator("#groundings textarea").inputValue();
  const src = await page.locator("#annotated-image img").first().getAttribute("src");
  const annotated = await page.evaluate(async (s) => {
    const bytes = new Uint8Array(await (await fetch(s)).arrayBuffer());
    let bin = "";
    for (const b of bytes) bin += String.fromCharCode(b);
    return btoa(bin);
  }, src);
  fs.writeFileSync(path.join(outDir, "annotated.png"), Buffer.from(annotated, "base64"));
  const examples = await page.getByText("Convert this chart to a table.").count();
  const samVisible = await page.locator("#use-sam").isVisible();
  await page.screenshot({ path: path.join(outDir, "demo_ui.png"), fullPage: true });
  console.log(JSON.stringify({ chat, coords, examples, samVisible, problems }));
} catch (err) {
  console.error(`browser check failed: ${err.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
