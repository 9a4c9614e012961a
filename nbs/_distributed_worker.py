"""Test worker for `07_distributed.ipynb` (not a notebook: nbdev neither tests nor documents files starting with `_`).

Launched by the notebook as `torchrun --nproc_per_node 2 _distributed_worker.py OUT PATHS DEADLINE`: every process joins a gloo
process group on loopback, trains tiny fastai `Learner`s with mixaug's callbacks, and pickles what it saw in each
training step to `OUT/rank{rank}.pkl`, and ends itself after `DEADLINE` seconds whatever happens (so that no process outlives a
test that timed out). `PATHS` is `ddp`, `fastai` or both, comma-separated:

- `ddp`: the model wrapped in torch's `DistributedDataParallel` by a small callback, each process loading its own
  shard of the data (`rank::world_size`);
- `fastai`: fastai's own `learn.distrib_ctx(cpu=True)` (Hugging Face Accelerate underneath), with the one CUDA-only
  line of fastai's `DistributedDL._broadcast` replaced by the same broadcast on the CPU.
"""
import os, sys, pickle, threading
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
import torch, torch.nn as nn, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.torch_core import set_seed
from mixaug.callbacks import MixUp, CutMix
from mixaug.mixers import CutMixUp

# Every sample carries its identity: global sample `g` is 1 in channel `g` and 0 elsewhere (4x4 pixels, so CutMix
# can cut boxes). Ids 0-23 are the labeled training set, 24-31 validation, 32-63 unlabeled (for SemiMix).
N_TRAIN,N_VALID,N_UNLAB,K,BS = 24,8,32,4,4
C = N_TRAIN+N_VALID+N_UNLAB
X = torch.eye(C).view(C,C,1,1).expand(C,C,4,4).contiguous()
Y = torch.arange(C) % K
TRAIN,VALID,UNLAB = range(N_TRAIN),range(N_TRAIN, N_TRAIN+N_VALID),range(N_TRAIN+N_VALID, C)

def shares(x):
    "`(n, C)`: the share of each source sample in each (mixed) sample of `x`"
    return x.float().mean((2,3))

def make_dls(ids_train, ids_valid):
    return DataLoaders(DataLoader([(X[i],Y[i]) for i in ids_train], bs=BS, shuffle=True),
                       DataLoader([(X[i],Y[i]) for i in ids_valid], bs=BS))

class DDPTrainer(Callback):
    "Wrap the model in `DistributedDataParallel` for the fit (the data is already sharded by rank)"
    order = 11  # where fastai's `DistributedTrainer` sits: before the mixing callbacks and the recorders
    def before_fit(self): self.learn.model = DistributedDataParallel(self.learn.model)
    def after_fit(self): self.learn.model = self.learn.model.module

class Seen(Callback):
    "Record each training batch's sample ids before mixing (`order` 80) or what came out of `mixer` (`order` 95)"
    run_valid = False
    def __init__(self, log, order, mixer=None): self.log,self.order,self.mixer = log,order,mixer
    def before_batch(self):
        if self.order < 90:
            self.log.append(dict(ids=shares(self.xb[0]).argmax(1).tolist(), model=type(self.model).__name__))
            return
        m,d = self.mixer.mix,self.log[-1]
        d.update(shares=shares(self.xb[0]), lam=None if m is None else m.lam.clone(), idx=None if m is None else m.idx.clone())
        p = getattr(self.mixer, 'partner_xb', None)
        if p is not None: d['partner_ids'] = shares(p[0] if isinstance(p, (tuple,list)) else p).argmax(1).tolist()

def run(path, make_cb, fresh_torch_seed=False, scramble=None, epochs=2):
    "Fit a new learner with callback `make_cb()` on `path`; return what was seen"
    rank,world = dist.get_rank(),dist.get_world_size()
    set_seed(0)  # same model init and data order on every rank and in every run
    if path=='ddp': dls = make_dls(TRAIN[rank::world], VALID[rank::world])
    else: dls = make_dls(TRAIN, VALID)  # fastai's `DistributedDL` shards it
    model = nn.Sequential(nn.Flatten(), nn.Linear(C*16, K))
    if fresh_torch_seed: torch.seed()  # torch seeded from the OS, different in each process, as when a script never seeds
    if scramble is not None: torch.manual_seed(scramble)  # global torch state changed between two runs
    cb,log,lf = make_cb(),[],nn.CrossEntropyLoss()
    cbs = [cb, Seen(log, 80), Seen(log, 95, cb)] + ([DDPTrainer()] if path=='ddp' else [])
    learn = Learner(dls, model, loss_func=lf, cbs=cbs)
    learn.remove_cb(ProgressCallback); learn.logger = lambda *a,**k: None  # quiet: only the pickles matter
    ctx = learn.distrib_ctx(cpu=True) if path=='fastai' else nullcontext()
    with ctx: learn.fit(epochs, 1e-2)
    return dict(log=log, loss_is_users=learn.loss_func is lf, model_after=type(learn.model).__name__,
                weights=torch.cat([p.detach().flatten() for p in learn.model.parameters()]))

def scenarios():
    "Name -> (callback maker, options of `run`)"
    res = dict(
        mixup=(MixUp,{}), cutmix=(CutMix,{}), cutmixup=(lambda: CutMixUp(per_sample=True),{}),
        half=(lambda: MixUp(p=.5),{}),
        same=(lambda: MixUp(same_on_all_ranks=True),{}),
        same_fresh=(lambda: MixUp(same_on_all_ranks=True),dict(fresh_torch_seed=True)),
        same_seeded_fresh=(lambda: MixUp(seed=5, same_on_all_ranks=True),dict(fresh_torch_seed=True)),
        seed1_a=(lambda: MixUp(seed=1),dict(scramble=111)), seed1_b=(lambda: MixUp(seed=1),dict(scramble=222)),
        seed2_a=(lambda: MixUp(seed=2),dict(scramble=111)),
        noseed_a=(MixUp,dict(scramble=111)), noseed_b=(MixUp,dict(scramble=222)),
    )
    try: from mixaug.semimix import SemiMix
    except ImportError as e: print(f"mixaug.semimix not importable ({e}): SemiMix not run", file=sys.stderr)
    else:
        unlab = lambda: DataLoader([X[i] for i in UNLAB], bs=BS)  # every process gets the whole unlabeled set
        res['semimix'] = (lambda: SemiMix(unlab(), alpha=.4),{})
    return res

def patch_fastai_broadcast():
    "Replace `DistributedDL._broadcast`, which moves the indices to CUDA (`.cuda()`), by the same broadcast on the CPU"
    from fastai.distributed import DistributedDL
    def _broadcast(self, t, rank):
        t = torch.tensor(t, dtype=torch.long)  # gloo broadcasts CPU tensors
        dist.broadcast(t, rank)
        return t.tolist()
    DistributedDL._broadcast = _broadcast

if __name__=='__main__':
    out,paths = Path(sys.argv[1]),sys.argv[2].split(',')
    watchdog = threading.Timer(float(sys.argv[3]) if len(sys.argv)>3 else 600., lambda: os._exit(3))
    watchdog.daemon = True; watchdog.start()
    dist.init_process_group('gloo', timeout=timedelta(seconds=60))  # address and port from torchrun (127.0.0.1)
    rank = dist.get_rank()
    if 'fastai' in paths: patch_fastai_broadcast()
    res = {}
    for path in paths:
        for name,(make_cb,kw) in scenarios().items():
            try: res[path,name] = run(path, make_cb, **kw)
            except Exception as e: res[path,name] = dict(error=f"{type(e).__name__}: {e}")
            dist.barrier()  # both ranks finish a scenario before the next starts
    (out/f'rank{rank}.pkl').write_bytes(pickle.dumps(res))
    dist.destroy_process_group()
