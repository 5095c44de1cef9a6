"""The fields every run config has, with their defaults; a config file starts from these.

from jaxtrain.configs import base

def get_config(arg=None):
    c = base.get_config()
    c.task = "mypkg.tasks:make_task"
    ...
    return c
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # What to train: "lm", "classification", or "package.module:make_task", a function
    # of the config returning a jaxtrain.Task.
    c.task = ""
    c.seed = 0  # parameter init, and the keys each step's rngs are drawn from
    c.global_batch_size = 32  # examples per step, all devices and processes together
    c.num_train_steps = 100  # the step the run ends at (a resumed run counts from its checkpoint)
    c.log_every_steps = 10  # log train metrics every N steps, and at the last step
    c.eval_every_steps = 100  # evaluate every N steps, and at the last step
    c.eval_steps = -1  # eval batches per evaluation, spread over the split; -1 = all of it
    c.checkpoint_every_steps = 100  # save every N steps, and at the last step
    # Gradient accumulation: each global batch runs as this many sequential parts (same
    # update, 1/microbatches of the activation memory).
    c.microbatches = 1

    # Mesh axis sizes, whose product is the device count; -1 takes the devices left over.
    # Order: data, fsdp, sequence, tensor (innermost, so its collectives stay between
    # neighbouring devices).
    c.mesh = dict(
        data=-1,  # data parallel: the batch splits over it; weights are copied
        fsdp=1,  # fully sharded data parallel: the batch and (by the rules) weights split
        sequence=1,  # sequence parallel: activations split along the sequence (by the rules)
        tensor=1,  # tensor parallel: heads, MLP and vocabulary dimensions (by the rules)
    )
    # Logical axis -> mesh axes. Changing parallelism is an edit here, not in the model.
    # "activation_batch" splits every input batch's leading (example) dimension.
    c.rules = (("activation_batch", ("data", "fsdp")),)
    # Logical axes of weights by path pattern, for models that name none (any Flax layer
    # as written): pairs (regex matching a whole variable path, one logical axis or None
    # per dimension; or None: replicated). The first match wins; a weight's own names
    # come before any pattern. E.g. ((r".*/kernel", ("embed", "mlp")),) with ("embed",
    # "fsdp") and ("mlp", "tensor") in rules. Paths read like "linear1/kernel".
    c.param_axes = ()

    c.data = dict(  # the examples: a bundled config names its data set here
        seed=0,  # shuffle order
        prefetch=2,  # batches made ready on device ahead of the step
        read_threads=16,  # grain threads reading batches ahead (0: read by the prefetch)
    )
    c.model = dict()  # the model's fields, read by the task (see the bundled configs)
    # The optimizer and its learning-rate schedule, by name (README "Optimizers and
    # schedules"). Shared fields are flat; each optimizer's own fields are in the sub-dict
    # named after it, and only the chosen one's may differ from these defaults.
    c.optim = dict(
        # adamw, lamb, lion, adafactor, sgd, muon, schedule_free_adamw or ademamix
        name="adamw",
        lr=1e-3,  # peak learning rate, after warmup (before lr_scaling)
        # warmup_cosine, linear (decay to lr * min_lr_ratio), constant, rsqrt (lr *
        # sqrt(warmup_steps / step) after warmup), or wsd (warmup, stable, decay at the end)
        schedule="warmup_cosine",
        warmup_steps=0,  # every schedule warms up linearly from 0 to lr over these steps
        min_lr_ratio=0.1,  # warmup_cosine, linear and wsd decay to lr * min_lr_ratio
        wsd_decay_fraction=0.2,  # wsd: the last fraction of num_train_steps that decays
        wsd_decay_shape="linear",  # wsd: how it decays: "linear", "cosine" or "sqrt"
        # Peak lr for the batch size: "none"; "linear": lr * global_batch_size /
        # reference_batch_size; "sqrt": lr * sqrt(that ratio). The scaled lr is the
        # schedule's peak and what is logged.
        lr_scaling="none",
        reference_batch_size=256,  # the global batch size `lr` was tuned at, for lr_scaling
        weight_decay=0.0,  # decoupled weight decay, on matrices and kernels only
        grad_clip_norm=1.0,  # clip the gradients' global norm to this
        # Moving average of the weights (jaxtrain.weights), in the optimizer state: evaluated
        # beside them (metrics "ema_*"), what sample and export use.
        ema_decay=0.0,  # 0: off; else < 1, the average spans about 1 / (1 - ema_decay) steps
        ema_warmup=False,  # decay by min(ema_decay, (1 + t) / (10 + t)) at update t
    )
    c.optim.adamw = dict(  # optim.name="adamw"
        b1=0.9,  # first-moment decay
        b2=0.999,  # second-moment decay
        eps=1e-8,  # denominator epsilon
    )
    c.optim.lamb = dict(  # optim.name="lamb": AdamW's moments, a layer-wise trust ratio
        b1=0.9,  # first-moment decay
        b2=0.999,  # second-moment decay
        eps=1e-6,  # denominator epsilon
    )
    c.optim.lion = dict(  # optim.name="lion": signs of interpolated momentum
        b1=0.9,  # how much momentum the update's sign takes
        b2=0.99,  # momentum decay
    )
    c.optim.adafactor = dict(  # optim.name="adafactor": factored second moments
        decay_rate=0.8,  # second-moment decay exponent: 1 - step**-decay_rate
        min_dim_size_to_factor=128,  # factor matrices whose two largest dims are this big
        clipping_threshold=1.0,  # clip each update's RMS to this; 0 = off
        multiply_by_parameter_scale=True,  # scale updates by each weight's RMS
        eps=1e-30,  # added to squared gradients
    )
    c.optim.sgd = dict(  # optim.name="sgd"; weight_decay is L2, through the momentum
        momentum=0.9,  # momentum decay; 0 = plain SGD
        nesterov=False,  # Nesterov's momentum
    )
    c.optim.muon = dict(  # optim.name="muon": Muon on weight matrices, Adam on the rest
        beta=0.95,  # momentum decay
        ns_steps=5,  # Newton-Schulz iterations orthogonalising each update
        nesterov=True,  # Nesterov momentum (Muon's and its Adam's)
        adam_b1=0.9,  # the Adam fallback's first-moment decay (embedding, head, vectors)
        adam_b2=0.999,  # the Adam fallback's second-moment decay
        eps=1e-8,  # epsilon of the orthogonalisation and of the Adam fallback
    )
    # optim.name="schedule_free_adamw" (needs optim.schedule="constant"); evaluation uses
    # its averaged weights.
    c.optim.schedule_free_adamw = dict(
        b1=0.9,  # interpolation between the averaged and the current weights
        b2=0.999,  # second-moment decay
        eps=1e-8,  # denominator epsilon
        weight_lr_power=2.0,  # each step's weight in the average: lr ** weight_lr_power
    )
    c.optim.ademamix = dict(  # optim.name="ademamix": AdamW plus a slow gradient EMA
        b1=0.9,  # fast first-moment decay
        b2=0.999,  # second-moment decay
        b3=0.9999,  # slow first-moment decay
        alpha=5.0,  # the slow EMA's weight in the update
        eps=1e-8,  # denominator epsilon
    )
    # A step whose loss or gradients are not finite never updates the state. Then:
    # "abort" stops with a report (step, loss, first bad gradient) and the batch saved in
    # the workdir; "skip" goes on (aborting after max_consecutive_skips in a row);
    # "rollback" restores the last checkpoint and goes on past the offending batches.
    c.nonfinite = dict(
        policy="abort",  # "abort", "skip" or "rollback" (above)
        max_consecutive_skips=10,  # under "skip": abort after this many bad steps in a row
    )
    c.precision = dict(  # the loss and logits are float32 whatever these say
        # What matmuls and activations compute in. "auto": bfloat16 on TPU and on NVIDIA
        # GPUs of compute capability 8.0+ (A100, L4, H100), float16 on older GPUs (T4,
        # V100), float32 on CPU; or "float32", "bfloat16", "float16".
        compute_dtype="auto",
        param_dtype="float32",  # parameters, optimizer state and the loss
        # float16 needs the loss scaled up (and the gradients back down) so that small
        # gradients survive: "auto" scales when computing in float16, "dynamic" always,
        # "none" never. The scale is part of the train state and logged as loss_scale.
        loss_scaling="auto",
        loss_scale_init=32768.0,  # the first scale (2**15); a step that overflows halves it
        loss_scale_growth_steps=2000,  # double the scale after this many finite steps in a row
    )
    # jax's persistent compilation cache: compiled programs are kept on disk, so the next
    # run of the same step (a rerun, a resume, the same config elsewhere) skips most of
    # compiling it. Shared by all runs; trusted code (do not share it with other users).
    c.compilation_cache = dict(
        # "auto": $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/jaxtrain/xla
        # (~/.cache/jaxtrain/xla); "" turns the cache off; or any directory.
        dir="auto",
        # Only programs that took at least this long to compile are kept (jax's default is
        # 1 s: the train step is cached, small helpers recompile faster than they load).
        min_compile_time_s=1.0,
        max_size_gb=4.0,  # least recently used programs are evicted past this; 0 = no limit
    )
    # A profiler trace (jax.profiler, each step annotated) of `num_steps` steps after the
    # first `skip_steps` of this run (compilation, warm-up): DIR/profile, for TensorBoard's
    # profile tab (`tensorboard --logdir DIR`) or XProf. 0 = no trace.
    c.profile = dict(
        num_steps=0,  # steps to trace; 0 = no trace
        skip_steps=5,  # steps of this run left out first (compilation, warm-up)
    )
    # An estimate of the run's energy and emissions, written to DIR/energy.json at the end.
    c.energy = dict(
        # Watts per device; 0 = measured by codecarbon on CPU and GPU hosts (NVML on
        # NVIDIA GPUs, RAPL or a load model on CPUs), the chip table (jaxtrain/hardware.py,
        # vendors' TDPs) on TPUs and in multi-process runs.
        device_watts=0.0,
        # Carbon intensity of the electricity, kg CO2e per kWh: about the 2023 world
        # average (Ember); set your grid's or provider's figure.
        grid_kg_co2e_per_kwh=0.48,
    )
    c.checkpoint = dict(  # Orbax checkpoints in DIR/checkpoints/<step>
        keep_latest=3,  # the newest N steps are kept (>= 1: a rerun resumes from the newest)
        keep_best=0,  # also keep the K best evaluated steps by best_metric; 0 = off
        best_metric="loss",  # the eval metric that ranks steps for keep_best
        best_mode="min",  # "min" or "max": which end of best_metric is best
        keep_every_steps=0,  # also keep, permanently, every step that is a multiple; 0 = off
        async_save=True,  # write in the background while training goes on
        # When every checkpoint in the workdir is damaged: True starts again from step 0
        # (they are kept as <step>.damaged); False refuses, so progress is never lost silently.
        restart_if_all_damaged=False,
        # Resume although the config changed fields that change what the run means (model,
        # data, batch, seed, optimizer); False refuses with the differences.
        allow_config_changes=False,
    )
    # Where metrics go besides the console, metrics.jsonl and TensorBoard (process 0 only).
    c.logging = dict(
        # Also log to Weights & Biases (pip install "jaxtrain[wandb]"); WANDB_MODE=offline
        # keeps the run under DIR/wandb/ for `wandb sync`. A rerun continues the same run.
        wandb=False,
        wandb_project="",  # W&B project; "" = $WANDB_PROJECT, else W&B's default
        wandb_entity="",  # W&B user or team; "" = $WANDB_ENTITY, else your default entity
        wandb_name="",  # W&B run name; "" = $WANDB_NAME, else the workdir's name
    )
    return c
