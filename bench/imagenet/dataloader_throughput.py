"""How fast torchvision's ImageNet evaluation pipeline alone (decode,
Resize(256), CenterCrop(224), ToTensor, Normalize, batching; see
imagenet_loader.py) delivers batches, with no model: the ceiling on any
Python evaluation fed by a DataLoader, to set beside qsweep's own reader.

usage: dataloader_throughput.py FOLDER [--workers 2] [--batch 64] [--limit N]
Prints one JSON line. seconds runs from asking for the first batch (so it
includes starting the workers) to the last. Peak RSS: peak_rss_main_mb is
this process, peak_rss_worker_mb the largest worker (RUSAGE_CHILDREN,
read after the DataLoader has joined them), and peak_rss_mb is main +
workers x largest worker, an upper bound: forked workers share pages with
the main process and need not peak together.
"""

import argparse
import json
import resource
import time

from imagenet_loader import add_arguments, data_loader

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
add_arguments(parser)
args = parser.parse_args()
loader = data_loader(args)
images = 0
started = time.perf_counter()
for batch, _ in loader:
    images += len(batch)
seconds = time.perf_counter() - started
main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
                  "workers": args.workers, "batch": args.batch,
                  "peak_rss_mb": round(main_mb + args.workers * worker_mb, 1),
                  "peak_rss_main_mb": round(main_mb, 1), "peak_rss_worker_mb": round(worker_mb, 1)}))
