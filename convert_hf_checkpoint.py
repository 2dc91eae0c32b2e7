"""Convert a locally saved Hugging Face causal LM (GPT-2, Llama, Mistral, Mixtral) into our checkpoint format.

    python convert_hf_checkpoint.py --hf_model_dir path/to/hf_model --output_dir runs/converted

The output directory holds config.yaml and model.safetensors; `model.load_pretrained(OUT)` reads it.
"""

import argparse
import sys

from model import save_pretrained
from model.hf_conversion import convert_hf_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_model_dir", required=True, help="directory written by transformers' save_pretrained")
    parser.add_argument("--output_dir", required=True, help="where to write config.yaml and model.safetensors")
    args = parser.parse_args(argv)
    try:
        model = convert_hf_checkpoint(args.hf_model_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    save_pretrained(model, args.output_dir)
    print(f"converted {args.hf_model_dir} ({model.num_parameters() / 1e6:.1f}M parameters) -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
