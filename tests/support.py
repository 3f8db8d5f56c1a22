"""Helpers the tests share (fixtures are in conftest.py)."""

from prefopt_jax.config import load_config


def quick(path, tiny, out_dir, *extra):
    return load_config(
        path,
        [
            f"model.source={tiny}",
            "mesh.fsdp=1",  # one device unless a test asks for the mesh (compiles faster)
            "train.steps=2",
            "train.warmup_steps=1",
            "data.num_train=16",
            "data.num_eval=8",
            "eval.num_generate=2",
            "eval.max_new_tokens=2",
            f"output.dir={out_dir}",
            *extra,
        ],
    )
