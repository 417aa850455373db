// Loads an export bundle with @huggingface/transformers (node, local files only) and prints JSON:
// token ids, the processor's pixel values, and embeddings from the processor's inputs and from the
// caller's own inputs (pixel values / ids read from a JSON file), so tests/test_transformers_js.py can
// compare transformers.js with onnxruntime-python on identical inputs and on each side's preprocessing.
//
//   node embed.mjs <bundle dir> <requests.json>
//   requests.json: {"dtype": "fp32" | "fp16" | "q8", "images": [paths], "texts": [strings],
//                   "pixel_values": {"dims": [...], "data": [...]}, "input_ids": {"dims": [...], "data": [...]}}
import { readFileSync } from 'node:fs';
import path from 'node:path';
import {
  env, AutoProcessor, AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection, RawImage, Tensor,
} from '@huggingface/transformers';

const [bundle, requestFile] = process.argv.slice(2);
const req = JSON.parse(readFileSync(requestFile, 'utf8'));
env.allowRemoteModels = false;  // nothing may come from the Hub: the bundle is the model
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(bundle));
const id = path.basename(path.resolve(bundle));
const opts = { dtype: req.dtype ?? 'fp32', device: 'cpu' };

const plain = (t) => ({ dims: t.dims, data: Array.from(t.data, Number) });
const out = { dtype: opts.dtype };

if (req.images) {
  const processor = await AutoProcessor.from_pretrained(id);
  const vision = await CLIPVisionModelWithProjection.from_pretrained(id, opts);
  const images = await Promise.all(req.images.map((p) => RawImage.read(p)));
  const inputs = await processor(images);
  out.pixel_values = plain(inputs.pixel_values);
  out.image_embeds = plain((await vision(inputs)).image_embeds);
  if (req.pixel_values) {
    const pv = new Tensor('float32', Float32Array.from(req.pixel_values.data), req.pixel_values.dims);
    out.image_embeds_given = plain((await vision({ pixel_values: pv })).image_embeds);
  }
}
if (req.texts) {
  const tokenizer = await AutoTokenizer.from_pretrained(id);
  const text = await CLIPTextModelWithProjection.from_pretrained(id, opts);
  const inputs = tokenizer(req.texts, { padding: true, truncation: true });
  out.input_ids = plain(inputs.input_ids);
  out.attention_mask = plain(inputs.attention_mask);
  out.pad_token_id = tokenizer.pad_token_id;
  out.text_embeds = plain((await text(inputs)).text_embeds);
  if (req.input_ids) {
    const ids = new Tensor('int64', BigInt64Array.from(req.input_ids.data, BigInt), req.input_ids.dims);
    const mask = new Tensor('int64', BigInt64Array.from(req.attention_mask.data, BigInt), req.attention_mask.dims);
    out.text_embeds_given = plain((await text({ input_ids: ids, attention_mask: mask })).text_embeds);
  }
}
process.stdout.write(JSON.stringify(out) + '\n');
