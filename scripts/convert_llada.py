"""Convert a LLaDA checkpoint (Hub id or local folder) into an Elastic-MDM folder with a new gap head.

    python scripts/convert_llada.py GSAI-ML/LLaDA-8B-Base outputs/llada-8b-elastic
    python scripts/convert_llada.py GSAI-ML/LLaDA-8B-Base outputs/llada-8b-elastic --adaln true --time_conditioning true

Streams shard by shard (peak memory ~ one source shard + one output shard). Options: --dtype, --max_shard_size,
--seed, --tokenizer, --revision, --overwrite; any other `--field value` is an ElasticMDMConfig override.
"""

import sys

from elastic_mdm.commands.convert import run_cli
from elastic_mdm.conversion.convert import convert_llada_checkpoint

if __name__ == "__main__":
    run_cli(convert_llada_checkpoint, sys.argv[1:], __doc__)
