"""``star-sp eval``: RULER-style accuracy of star attention against global attention. Builds the tasks,
lengths and methods from the flags, loads the model once, and hands the work to ``eval.runner``, which
writes results.jsonl (resumable), summary.md/json and the plots to ``--out``.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from ..distributed.process_group import close_process_group
from ..errors import StarInputError
from ..models import resolve_model
from .model_arg import load_model, load_tokenizer, model_config
from .report import run_on_every_rank, same_everywhere, prints_for_host


def evaluate(args) -> int:
    from ..config import StarConfig
    from ..distributed.process_group import init_from_env
    from ..eval import runner
    from ..eval.plots import write_plots
    from ..eval.tasks import resolve_tasks
    from ..integrations.hf.engine import StarEngine
    from .runconfig import RunConfig
    from .tracking import Tracker

    split = lambda text: [x for x in text.split(",") if x.strip()]  # noqa: E731

    def parse():
        if args.samples < 1:
            raise StarInputError(f"--samples must be a positive integer, got {args.samples}")
        if args.batch < 1:
            raise StarInputError(f"--batch must be a positive integer, got {args.batch}")
        return (resolve_tasks(split(args.tasks)), [runner.parse_length(x) for x in split(args.lengths)],
                runner.parse_methods(split(args.attention), split(args.block_size), split(args.anchor_size)),
                RunConfig(model=resolve_model(args.model), dtype=args.dtype, device=args.device, seed=args.seed))

    tasks, lengths, methods, cfg = same_everywhere(parse)
    args.model = cfg.model
    group, device, created = init_from_env(args.collective_timeout_s, cfg.device)
    ok = False
    try:
        rank = dist.get_rank(group) if group is not None else 0
        path, config = run_on_every_rank(group, "model config", lambda: model_config(cfg))
        model = run_on_every_rank(group, "load model",
                         lambda: load_model(cfg, path, config, device, progress=prints_for_host(rank) and not args.quiet))

        def need_tokenizer():
            tok = load_tokenizer(args.model)
            if tok is None:
                raise StarInputError(f"{args.model} has no tokenizer files; star-sp eval writes its tasks as text "
                                     "and needs the model's tokenizer")
            chat = runner.prompt_parts(tok, args.prompt)
            # the chat template's tokens come on top of each length: they must fit the positions too
            extra = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in chat) if chat else 0
            budget = max(runner.answer_budget(t, args.max_new_tokens) for t in tasks)
            limit = getattr(model.config, "max_position_embeddings", None)
            if limit is not None and max(lengths) + extra + budget > limit:
                if chat:
                    raise StarInputError(f"length {max(lengths)} plus the chat template's {extra} tokens and {budget} "
                                         f"answer tokens exceeds the model's {limit} positions; use shorter --lengths "
                                         "(or --prompt plain)")
                raise StarInputError(f"length {max(lengths)} plus {budget} answer tokens exceeds the model's "
                                     f"{limit} positions; use shorter --lengths")
            return tok, chat

        tokenizer, chat = run_on_every_rank(group, "tokenizer", need_tokenizer)

        def make_engine(method, length):
            block, anchor = method.sizes(length)
            star = StarConfig(block_size=block, anchor_size=anchor, anchor_source=args.anchor_source,
                              backend=args.backend, collective_timeout_s=args.collective_timeout_s,
                              decode_graphs=args.decode_graphs, decode_kernel=args.decode_kernel,
                              compile=args.compile)
            # global attention is the plain model in one process: under a launcher every rank runs it alone
            return StarEngine(model, star, None if method.attention == "global" else group, attention=method.attention)

        config = {"model": args.model, "tasks": tasks, "lengths": lengths, "methods": [m.name for m in methods],
                  "samples": args.samples, "seed": args.seed, "anchor_source": args.anchor_source,
                  "world_size": dist.get_world_size(group) if group is not None else 1}
        if args.wandb:
            run_on_every_rank(group, "wandb", Tracker.require)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
        tracker = Tracker(args.wandb, config, args.out, enabled=rank == 0)

        def share(obj):
            if group is None:
                return obj
            box = [obj]
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
            return box[0]

        settings = {"model": os.path.abspath(args.model), "dtype": args.dtype, "seed": args.seed,
                    "anchor_source": args.anchor_source, "backend": args.backend,
                    "max_new_tokens": args.max_new_tokens, "prompt": "chat" if chat else "plain",
                    "template": runner.template_id(*chat) if chat else None}
        summary = runner.run(make_engine=make_engine, tokenizer=tokenizer, tasks=tasks, lengths=lengths,
                             methods=methods, samples=args.samples, out_dir=args.out, seed=args.seed, batch=args.batch,
                             is_writer=rank == 0, max_new_tokens=args.max_new_tokens, progress=not args.quiet,
                             on_row=tracker.log_row, settings=settings, share=share, chat=chat)
        if rank == 0:
            plots = write_plots(summary, args.out)
            table = runner.markdown_table(summary)
            tracker.log_summary(summary, table, plots)
            tracker.finish()
            print(table)
            print(f"\nresults: {os.path.join(args.out, 'results.jsonl')}\nplots: {', '.join(plots)}"
                  + (f"\nW&B run: {tracker.directory}" if tracker.directory else ""))
            print(f"summary: {os.path.join(args.out, 'summary.md')}")
        ok = True
    finally:
        if created:
            close_process_group(ok)
    return 0
