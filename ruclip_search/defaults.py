"""Every default in one place: the CLI's help texts, the Python API and the HTTP API all read these.

Change a value here and every entry point follows; nothing else in the package repeats a number below.
"""

from __future__ import annotations

#: The model an index is built with when none is named (768-d embeddings).
MODEL = "ruclip-vit-large-patch14-224"

#: Largest image the indexer decodes, in pixels: PIL's hard decompression-bomb limit (2 x
#: Image.MAX_IMAGE_PIXELS, ~179 MP, ~537 MB as RGB). Large enough for medium-format cameras and stitched
#: panoramas; raise it with `build --max-pixels`.
MAX_PIXELS = 178_956_970

#: Largest uploaded query image the server decodes, in pixels: a query needs no more, and a server must
#: bound what one request can make it allocate.
UPLOAD_MAX_PIXELS = 60_000_000

#: Largest upload the server accepts, in bytes (a 50 MP phone JPEG is about 20 MB).
UPLOAD_MAX_BYTES = 25 * 1024 * 1024

#: Results per page, everywhere (CLI -k, Index.search k, HTTP k); HTTP caps k and offset.
K = 20
MAX_K = 200
MAX_OFFSET = 10_000

#: Images per model batch: 8 on the CPU (bigger is no faster there, and a small batch lets encoding start
#: early and overlap with decoding), 256 on a GPU (ViT-L/14 on an H200: 1,985-2,033 images/s at 64, 2,047-2,104
#: at 256, 2,066-2,132 at 512, fp16-bf16; the GPU decode path decodes a batch at a time too).
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 256

#: How `build` decodes photos (`--decode`): "cpu" worker processes (PIL), "gpu" JPEGs by nvJPEG on the model's GPU
#: (other files still by the workers), "auto" gpu when the model is on a GPU with nvJPEG, else cpu.
DECODE_MODES = ("auto", "cpu", "gpu")
DECODE = "auto"

#: Cosine similarity above which two photos count as near-duplicates (`dupes`).
DUPLICATE_THRESHOLD = 0.95

#: Weight of each `--minus` term in a combined query.
MINUS_WEIGHT = 0.5

#: FAISS index types a build or reindex accepts; "auto" is exact below 50k images, else ANN.
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
INDEX_TYPE = "auto"

#: Memory an index's vectors may take in RAM when `auto` picks its type (`--memory-budget`): IVF-Flat (every
#: vector as float32) while it fits, up to a few million vectors; IVF-PQ codes (48 bytes for 768-d, re-ranked on
#: the stored float16 vectors) beyond. 4 GiB: IVF-Flat to ~1.3M 768-d vectors; 10M as IVF-PQ take ~0.6 GB.
MEMORY_BUDGET = 4 * 1024**3

#: Text query embeddings kept per open index (paging and repeated queries skip the encoder).
TEXT_CACHE_SIZE = 512

#: Thumbnails: allowed longest sides, the default, and the server's in-memory cache size.
THUMB_MIN, THUMB_MAX, THUMB_SIZE = 16, 1024, 256
THUMB_CACHE_BYTES = 64 * 1024 * 1024

#: Images a server decodes at once (thumbnails and uploaded query images): each may hold a whole decoded
#: image (a thumbnail up to MAX_PIXELS x 3 bytes, ~537 MB), so this bounds the server's decoding memory.
DECODE_SLOTS = 2

#: How often a server checks whether a build finished (seconds, on the request path); an open Index also
#: picks up other processes' writes this often.
REFRESH_INTERVAL = 0.5

#: Photos an `Index.add_many` commits per transaction.
WRITE_BATCH = 64

#: The CPU niceness of a server's writer process (`serve --writer-process`) where it does not run under SCHED_IDLE
#: (below), and while it is lifted out of it. 10: at 1M photos on 2 cores, with searches paced to half capacity
#: and 200 writes/s, the search p50 rose +33, +23, +39 % at nice 10 against +53, +44, +53 % at nice 0 (alternate
#: runs of scripts/bench_online.py, same code and index). A write costs the searches less by its CPU than by when
#: it runs: a search waiting for its turn at the server's GIL also waits for a core. Flat out the writes still
#: reached 313, 304, 304 writes/s at nice 10 (they starved at nice 10 when a write cost ~3 ms of CPU: 148-200
#: writes/s).
WRITER_NICE = 10

#: The writer process's CPU priority: "idle" (Linux's SCHED_IDLE, with WRITER_NICE beneath it) or a niceness;
#: RUCLIP_SEARCH_WRITER_NICE overrides it. "idle" becomes WRITER_NICE where the server could not lift the child
#: out of SCHED_IDLE (no CAP_SYS_NICE nor RLIMIT_NICE for it). At 1M photos on 2 cores, searches paced to
#: 130/s, 200 writes/s, six pairs of runs alternating on one index (bench_online.py --search-rate 130, 6-8
#: rounds): search p50 rise +21, +8, +28, +30, +26, +22 % under SCHED_IDLE against +32, +22, +28, +37, +22,
#: +34 % at nice 10 (medians +24 / +30 %). Flat out the writes kept 237-324 writes/s (nice 10: 274-347), and
#: 310 beside 8 searchers flat out (the guard lifted the writer then).
WRITER_PRIORITY = "idle"

#: The guard of a SCHED_IDLE writer (server/priority.py): every WRITER_STARVE_WINDOW seconds it reads the child's
#: run-queue delay; a child that waited for a core more than WRITER_STARVED of the window runs at WRITER_NICE
#: for WRITER_LIFT seconds. SCHED_IDLE gets ~0.3 % of a busy core (weight 3 against 1024): unguarded, a
#: saturated machine would stall the writes for as long as it stays saturated.
WRITER_STARVE_WINDOW = 0.05
WRITER_STARVED = 0.5
WRITER_LIFT = 5.0

#: Group commit in a server's writer process: while writes keep coming (the previous group was committed less
#: than WRITER_BUSY seconds ago), a write waits up to WRITER_COMMIT_DELAY seconds for others to share its
#: transaction (as PostgreSQL's commit_delay); a write after a quiet spell is committed at once. A group's fixed
#: cost (transaction, statements, the answer, the server applying it) was ~1.3 ms of a ~1.8 ms write at 200
#: writes/s, whose groups averaged 1.4 writes without the delay (scripts/bench_online.py, py-spy).
WRITER_COMMIT_DELAY = 0.005
WRITER_BUSY = 0.1

#: Photos changed since the FAISS file was written above which a writable Index rewrites it (compaction,
#: in a background thread); below it they are searched exactly next to the FAISS file.
SEGMENT_MAX = 50_000

#: Most labels one photo written over HTTP may carry, and most collection/label values one search names.
MAX_LABELS = 100

#: `watch`: a changed file is indexed once its size and mtime have been still for WATCH_SETTLE seconds (so a
#: half-written file never is); files settling within WATCH_GATHER seconds of each other share one batch (at
#: most WATCH_MAX_BATCH paths); a batch that finds the index locked is retried every WATCH_RETRY seconds; the
#: FAISS file (batches are searchable through the change log without it) is rewritten when the watcher is
#: idle and the file has missed changes for WATCH_REINDEX seconds; WATCH_WORKERS decoding processes are kept
#: running.
WATCH_SETTLE = 0.5
WATCH_GATHER = 0.3
WATCH_MAX_BATCH = 1000
WATCH_RETRY = 1.0
WATCH_REINDEX = 60.0
WATCH_WORKERS = 2

#: `export`: rows per Parquet shard (and per clip-retrieval .npy file, held in memory as float16 while written).
EXPORT_SHARD_ROWS = 100_000

#: Where `serve` listens unless told otherwise (loopback only).
HOST, PORT = "127.0.0.1", 8000

#: Videos: the frames indexed lie at these fractions of the duration (five: a scene that fills a fifth of a
#: video is caught); finding one decodes at most VIDEO_SEEK_FRAMES frames after its keyframe. A RAW or video file
#: whose decoding takes longer than DECODE_TIMEOUT seconds is recorded as an error (never a hung build).
VIDEO_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
VIDEO_SEEK_FRAMES = 48
DECODE_TIMEOUT = 60.0
