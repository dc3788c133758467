"""The cascade sampler: prompts → T5 → stage 1 → stage 2 (→ stage 3) → images.

Any mix of stages drives through it: Imagen's continuous-time stages and
converted DeepFloyd IF stages alike (``imagen_jax.stages``).

    cascade = Cascade.from_workdir("runs/demo")          # config + EMA params
    cascade = Cascade.from_workdir("if_I,if_II")         # converted IF stages
    out = cascade.sample(["a red circle in the top left"], jax.random.key(0),
                         SampleRequest(num_per_prompt=4))  # or num_per_prompt=4
    out.final            # uint8 [4, R, R, 3], the last stage's images
    out.images["base"]   # every stage's images, uint8 [4, R_stage, R_stage, 3]
    out.timings          # per stage: compile and run seconds

Prompts are encoded once (the empty prompt, for classifier-free guidance,
once per cascade; or the negative prompts). Each stage samples with its own
``config.stages.NAME.sample`` settings (sampler, steps, guidance,
thresholding, ...), sampler, steps and guidance overridable per call; stage
k > 1 conditions on stage k-1's output through ``Stage.lowres_inputs`` (resized
and noise-augmented at the stage's level). Each stage's whole denoising loop is
ONE jitted call (the sampler's); under a mesh its batch is split over the
data-parallel axes (padded to a multiple of their size, cut back afterwards).
Image i of the output is sample ``i % num_per_prompt`` of prompt
``i // num_per_prompt``.

Guidance: a scale of 1 (or 'off' / 'none'; None in the config) samples the
conditional model alone (one forward pass on B rows; w = 1 is exactly that);
any other scale runs classifier-free guidance, one forward pass on the doubled
[uncond; cond] batch. Changing one guided scale to another does not
recompile; switching guidance on or off does.

Modules: ``driver`` (``Cascade``: prompts → text → stages), ``request`` (a
call's options and batching), ``edits`` (image-to-image, inpainting, start
stage: plans and checks), ``images`` (the output, grids, files), ``timing``
(compile and run seconds per stage), ``residency`` (which params wait in host memory
between their uses: ``Cascade(..., offload=...)``).
"""

from imagen_jax.cascade.driver import Cascade, sampling_mesh, sub_cascade  # noqa: F401
from imagen_jax.cascade.edits import EditPlan, check_start  # noqa: F401
from imagen_jax.cascade.images import (  # noqa: F401
  CascadeOutput,
  captioned_grid,
  make_grid,
  save_outputs,
)
from imagen_jax.cascade import residency  # noqa: F401
from imagen_jax.cascade.request import SampleRequest, noise_level_configs, per_stage  # noqa: F401
from imagen_jax.cascade.timing import CompileTimer, StageTiming, timings_table  # noqa: F401
