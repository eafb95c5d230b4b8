"""`bigbatch demo-data DIR`: write the demo data set (procedural shapes as webdataset shards).

The flags are parsed before anything heavy is imported: `--help` and a mistake answer at once.
"""

from __future__ import annotations

from bigbatch.flags import Parser


def main(argv: list[str] | None = None) -> int:
    """``bigbatch demo-data DIR``: write the demo data set, print where it is; returns the exit status."""
    parser = Parser(prog="bigbatch demo-data", description=__doc__.splitlines()[0])
    parser.add_argument("dir", metavar="DIR", help="output directory")
    parser.add_argument("--num-train", type=int, default=10_240, help="training samples (default 10240: whole steps of 128)")
    parser.add_argument("--num-val", type=int, default=1_000, help="validation samples (default 1000)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    from bigbatch.data.demo import write_demo_dataset  # the data package imports torch: not for --help

    try:
        summary = write_demo_dataset(args.dir, num_train=args.num_train, num_val=args.num_val,
                                     image_size=args.image_size, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    for split in ("train", "val"):
        info = summary[split]
        shards = f"{info['num_shards']} shard" + ("s" if info["num_shards"] != 1 else "")
        print(f"{split}: {info['num_samples']} samples in {shards}: {info['pattern']}")
    print(f"classes: {summary['classnames']}\ntemplates: {summary['templates']}")
    print(f"wrote in {summary['seconds']} s; train with:\n"
          f"  --train-data '{summary['train']['pattern']}' --val-data '{summary['val']['pattern']}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
