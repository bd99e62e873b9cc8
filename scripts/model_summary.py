"""One line from the JSON summary that `python -m examples.nat_classifier.train` prints last (stdin)."""
import json
import sys

try:
    d = json.loads(sys.stdin.read())
    print(f"{d['ms_per_step']:.2f} ms/step, {d['images_per_s']:.0f} img/s, peak {d['peak_memory_gib']} GiB, "
          f"loss {d['final_loss']:.3f}")
except (ValueError, KeyError, TypeError) as e:
    print("no result:", e)
