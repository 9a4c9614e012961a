"""Benchmark mixaug's mixing callbacks against fastai, timm, torchvision (and fastxtend) inside real fastai fits.

One command: `python tools/benchmark.py` writes `nbs/benchmark_results.json` (and `--threads 1 --out
nbs/benchmark_results_1thread.json` the one-thread run), which `nbs/05_benchmark.ipynb` shows. All on the CPU, in
one process:

- `counts`: kernel ops, host syncs and bytes read and written per mixed batch of 3x128x128 images (exact, noise-free:
  `mixaug.test_utils.CountOps`, `CountSyncs`' rule, `CountBytes`), for every timed contender, on a batch of 64.
- `overhead`: the time a mixing callback adds to a training batch of 3x128x128 images, inside `Learner.fit`, for
  several batch sizes. Each round fits one epoch of every contender, in a fresh random order; a contender's time in a
  round is the median of its batches, its overhead that minus the no-callback time of the same round. Comparisons
  are paired by round (`paired_ratio`: the ratio per round to the reference's overhead), summarised by the median
  over rounds with a bootstrap 95% interval over rounds (`boot_ci`); a ratio is resolved where the interval excludes 1.
- `memory`: the peak of the bytes allocated (and not yet freed) while a callback mixes a batch and its loss runs,
  read from torch's profiler, as a multiple of the batch's own size.
- `throughput`: samples per second of a small CNN trained on 3x32x32 images, with and without each callback, paired
  by round in the same way (the ratio per round to the no-callback fit).

With `--gpu` (on a machine with CUDA): fits of every mixaug callback with any host-device sync raising
(`gpu_sync_check`), and the per-batch overhead measured with CUDA events at 3x224x224 (`gpu_overhead`), into
`nbs/benchmark_gpu.json`.
"""
from __future__ import annotations
import argparse, json, os, platform, random, subprocess, sys, time, warnings, datetime
from functools import partial
import numpy as np, torch, torch.nn as nn
import fastai, timm, torchvision
from fastai.basics import Learner, DataLoaders, CrossEntropyLossFlat
from fastai.data.load import DataLoader
from fastai.callback.core import Callback, CancelValidException
import fastai.callback.mixup as fmix
from timm.data import Mixup as TimmMixup
from torchvision.transforms import v2
import mixaug
from mixaug.test_utils import CountOps, CountBytes
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mask_family import git_state, engine_match, loaded_sources
from mixaug.callbacks import MixUp, CutMix
from mixaug.mixers import CutMixUp
from mixaug.semimix import SemiMix

warnings.filterwarnings('ignore')
N_CLASSES = 10

def fastxtend_callbacks():
    "fastxtend's `MixUp` and `CutMix`, or None with the reason they can't be imported here"
    try:
        from fastxtend.callback import cutmixup as fx
        return fx, None
    except Exception as e: return None, f'{type(e).__name__}: {e}'.split('\n')[0]

# ---- contenders: each is a function returning (callbacks, loss function) ----

class PeerMix(Callback):
    "Mix `learn.xb`/`learn.yb` with a peer's batch transform `fn(x, y) -> (x, soft_y)` before each training batch"
    order,run_valid = 90,False
    def __init__(self, fn): self.fn = fn
    def before_batch(self):
        x,y = self.fn(self.xb[0], self.yb[0])
        self.learn.xb,self.learn.yb = (x,),(y,)

def floor_lerp(x, y):
    "The ideal single pass: one gather of the partners and one interpolation into it"
    n = len(x)
    return x[torch.randperm(n)].lerp_(x, torch.rand(n,1,1,1)), y

def floor_copy(x, y): return x.clone(), y

class Floor(Callback):
    "A floor contender: replaces the batch's input by `fn(x, y)[0]`, targets untouched"
    order,run_valid = 90,False
    def __init__(self, fn): self.fn = fn
    def before_batch(self): self.learn.xb = (self.fn(self.xb[0], self.yb[0])[0],)

def timm_fn(mode, cutmix):
    m = TimmMixup(mixup_alpha=0. if cutmix else .4, cutmix_alpha=1. if cutmix else 0., mode=mode,
                  label_smoothing=0., num_classes=N_CLASSES)
    return m

def tv_fn(cutmix):
    t = v2.CutMix(alpha=1., num_classes=N_CLASSES) if cutmix else v2.MixUp(alpha=.4, num_classes=N_CLASSES)
    return lambda x,y: t(x, y)

def contenders(include=None):
    "Name -> (kind, factory of `(callbacks, loss_func)`); kind is the fastai contender it is compared with"
    ce_flat,ce = CrossEntropyLossFlat,nn.CrossEntropyLoss
    c = {
        'none':               ('none',   lambda: ([], ce_flat())),
        'floor: copy':        ('floor',  lambda: ([Floor(floor_copy)], ce_flat())),
        'floor: gather+lerp': ('floor',  lambda: ([Floor(floor_lerp)], ce_flat())),
        'fastai MixUp':       ('mixup',  lambda: ([fmix.MixUp()], ce_flat())),
        'fastai CutMix':      ('cutmix', lambda: ([fmix.CutMix()], ce_flat())),
        'mixaug MixUp':       ('mixup',  lambda: ([MixUp()], ce_flat())),
        'mixaug MixUp per_batch': ('mixup', lambda: ([MixUp(per_batch=True)], ce_flat())),
        'mixaug CutMix':      ('cutmix', lambda: ([CutMix()], ce_flat())),
        'mixaug CutMix per_batch': ('cutmix', lambda: ([CutMix(per_batch=True)], ce_flat())),
        'timm MixUp batch':   ('mixup',  lambda: ([PeerMix(timm_fn('batch', False))], ce())),
        'timm MixUp elem':    ('mixup',  lambda: ([PeerMix(timm_fn('elem', False))], ce())),
        'timm CutMix batch':  ('cutmix', lambda: ([PeerMix(timm_fn('batch', True))], ce())),
        'timm CutMix elem':   ('cutmix', lambda: ([PeerMix(timm_fn('elem', True))], ce())),
        'torchvision MixUp':  ('mixup',  lambda: ([PeerMix(tv_fn(False))], ce())),
        'torchvision CutMix': ('cutmix', lambda: ([PeerMix(tv_fn(True))], ce())),
    }
    fx,_ = fastxtend_callbacks()
    if fx is not None:
        c['fastxtend MixUp'] = ('mixup', lambda: ([fx.MixUp()], ce_flat()))
        c['fastxtend CutMix'] = ('cutmix', lambda: ([fx.CutMix(uniform=False)], ce_flat()))
    if include: c = {k:v for k,v in c.items() if k in include}
    return c

# ---- data and model ----

class PoolDL(DataLoader):
    "`n_batches` batches per epoch, each a fresh copy of a batch kept in memory (as collation would make)"
    def __init__(self, x, y, n_batches, **kwargs):
        self.px,self.py = x,y
        super().__init__(range(len(x)*n_batches), bs=len(x), **kwargs)
    def create_batch(self, b): return self.px.clone(),self.py.clone()

class Strided(nn.Module):
    "A model cheap enough that the mixing cost shows: a linear layer on every 8th pixel"
    def __init__(self, c, h, w): super().__init__(); self.lin = nn.Linear(c*((h+7)//8)*((w+7)//8), N_CLASSES)
    def forward(self, x): return self.lin(x[:, :, ::8, ::8].flatten(1))

class NoValid(Callback):
    "Skip validation: only training batches are measured"
    def before_validate(self): raise CancelValidException

class Spans(Callback):
    "Time `before_batch` (all callbacks) and from the first `after_pred` to the last `after_loss`, per batch: wall and CPU time"
    def __init__(self, first:bool, rec): self.first,self.rec,self.order = first,rec,(-1000 if first else 1000)
    def _now(self): return time.perf_counter(),time.thread_time()
    def before_batch(self):
        if self.first: self.rec['t0'] = self._now()
        else: self.rec['bb'] = [b-a for a,b in zip(self.rec['t0'], self._now())]
    def after_pred(self):
        if self.first: self.rec['t1'] = self._now()
    def after_loss(self):
        if self.first: return
        (w,c),(w1,c1) = self._now(),self.rec['t1']
        self.rec['spans'].append(self.rec['bb'][0] + w-w1)
        self.rec['cpu_spans'].append(self.rec['bb'][1] + c-c1)

def quiet_learner(*args, **kwargs):
    "A `Learner` without fastai's progress bar (a default callback once `fastai.callback.progress` is imported): nothing but the fit is timed"
    from fastai.callback.progress import ProgressCallback
    learn = Learner(*args, **kwargs)
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
    return learn

def make_learner(factory, x, y, n_batches, model=None):
    cbs,lf = factory()
    rec = dict(spans=[], cpu_spans=[])
    dls = DataLoaders(PoolDL(x, y, n_batches), PoolDL(x[:2], y[:2], 1))
    learn = quiet_learner(dls, model if model is not None else Strided(*x.shape[1:]), loss_func=lf,
                    cbs=cbs+[NoValid(), Spans(True, rec), Spans(False, rec)])
    learn.rec = rec
    return learn

def batch(bs, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(bs, 3, size, size, generator=g),torch.randint(0, N_CLASSES, (bs,), generator=g)

# ---- 0. kernel ops and host syncs ----

def op_contenders():
    "Name -> (callbacks, loss function, number of inputs) for the op counts: mixaug's options and the peers"
    ce_flat,ce = CrossEntropyLossFlat,nn.CrossEntropyLoss
    c = {
        'fastai MixUp':           (lambda: [fmix.MixUp()], ce_flat, 1),
        'fastai CutMix':          (lambda: [fmix.CutMix()], ce_flat, 1),
        'mixaug MixUp':           (lambda: [MixUp()], ce_flat, 1),
        'mixaug MixUp per_batch': (lambda: [MixUp(per_batch=True)], ce_flat, 1),
        'mixaug MixUp fold=False':(lambda: [MixUp(fold=False)], ce_flat, 1),
        'mixaug MixUp alpha=1':   (lambda: [MixUp(alpha=1.)], ce_flat, 1),
        'mixaug MixUp p=0.5':     (lambda: [MixUp(p=.5, seed=0)], ce_flat, 1),
        'mixaug MixUp, 2 inputs': (lambda: [MixUp()], ce_flat, 2),
        'mixaug CutMix':          (lambda: [CutMix()], ce_flat, 1),
        'mixaug CutMix per_batch':(lambda: [CutMix(per_batch=True)], ce_flat, 1),
        'mixaug CutMix alpha=0.4':(lambda: [CutMix(alpha=.4)], ce_flat, 1),
        'mixaug CutMix, 2 inputs':(lambda: [CutMix()], ce_flat, 2),
        'mixaug CutMixUp':        (lambda: [CutMixUp(seed=0)], ce_flat, 1),
        'mixaug CutMixUp per_sample': (lambda: [CutMixUp(per_sample=True)], ce_flat, 1),
        'mixaug CutMixUp per_sample, 2 inputs': (lambda: [CutMixUp(per_sample=True)], ce_flat, 2),
        'mixaug SemiMix':         (lambda: [SemiMix()], ce_flat, 1),
        'mixaug SemiMix, 2 inputs': (lambda: [SemiMix()], ce_flat, 2),
        'timm MixUp batch':       (lambda: [PeerMix(timm_fn('batch', False))], ce, 1),
        'timm MixUp elem':        (lambda: [PeerMix(timm_fn('elem', False))], ce, 1),
        'timm CutMix batch':      (lambda: [PeerMix(timm_fn('batch', True))], ce, 1),
        'timm CutMix elem':       (lambda: [PeerMix(timm_fn('elem', True))], ce, 1),
        'torchvision MixUp':      (lambda: [PeerMix(tv_fn(False))], ce, 1),
        'torchvision CutMix':     (lambda: [PeerMix(tv_fn(True))], ce, 1),
    }
    return c

class _Both:
    "`CountOps` (ops, syncs) and `CountBytes` (bytes read and written) over the same ops"
    def __enter__(self): self.b,self.o = CountBytes(),CountOps(); self.b.__enter__(); self.o.__enter__(); return self
    def __exit__(self, *a): self.o.__exit__(*a); self.b.__exit__(*a)

def _drive(cbs, lf, x, y, n_in):
    "A function running one training batch's `before_batch` and loss through `cbs`, returning two counters (`CountOps` and `CountBytes` over them)"
    dls = DataLoaders(PoolDL(x, y, 1), PoolDL(x[:2], y[:2], 1))
    learn = quiet_learner(dls, Strided(*x.shape[1:]), loss_func=lf, cbs=cbs)
    learn.training,learn.pct_train,learn.epoch,learn.n_epoch,learn.iter = True,0.,0,1,0
    for cb in cbs: getattr(cb, 'before_train', lambda: None)()  # fastai's mixers swap the loss here
    pred = torch.randn(len(x), N_CLASSES)
    def once():
        learn.xb,learn.yb = tuple(x.clone() for _ in range(n_in)),(y.clone(),)
        with _Both() as bb: learn('before_batch')
        learn.pred = pred; learn('after_pred')
        with _Both() as lo: learn.loss_grad = learn.loss_func(learn.pred, *learn.yb)
        learn('after_loss')
        mixed = any(getattr(cb, 'mix', 1) is not None for cb in cbs)  # mixaug's `mix` is None on a batch left as is
        return bb,lo,mixed
    return once

def _count(cbs, lf, x, y, n_in, plain):
    "Ops, syncs and bytes of one mixed batch through `cbs`, `before_batch` and the loss, over `plain` (the plain loss's counters)"
    once = _drive(cbs, lf, x, y, n_in)
    once()  # constants made once per shape and device are made here
    for _ in range(20):  # with p < 1, until a batch is mixed
        bb,lo,mixed = once()
        if mixed: break
    return dict(inputs=n_in, before_batch=bb.o.n, loss=lo.o.n-plain.o.n, total=bb.o.n+lo.o.n-plain.o.n, syncs=bb.o.syncs+lo.o.syncs,
                bytes=bb.b.n+lo.b.n-plain.b.n)

def _plain(x, y):
    once = _drive([], CrossEntropyLossFlat(), x, y, 1)
    once(); return once()[1]  # the plain loss, as fit runs it

def op_counts(bs=64, size=32):
    "Kernel ops (not views, not `empty`), host syncs and bytes per mixed training batch of `bs` images with class indices, over the plain loss"
    x,y = batch(bs, size)
    plain = _plain(x, y)
    return {k:_count(cbs(), lf(), x, y, n_in, plain) for k,(cbs,lf,n_in) in op_contenders().items()}

def counts(bs=64, size=128, include=None):
    "`op_counts` of the timed contenders on a batch of `bs` 3x`size`x`size` images: name -> counts, `bytes` also as multiples of the batch's bytes (`batches`)"
    x,y = batch(bs, size)
    plain,res = _plain(x, y),{}
    for k,(_,f) in contenders(include).items():
        cbs,lf = f()
        r = res[k] = _count(cbs, lf, x, y, 1, plain)
        r['batches'] = r['bytes']/(x.numel()*x.element_size())
    return res

# ---- GPU: syncs inside fits, and overhead measured with CUDA events ----

def _sync_mode(mode):
    if torch.cuda.is_available(): torch.cuda.set_sync_debug_mode(mode)  # without CUDA (a smoke run), nothing to check

class SyncError(Callback):
    "Make any host-device sync raise from `before_batch` to `after_loss`: the mixing, the model, the (mixed) loss"
    order = -1000
    def before_batch(self): _sync_mode('error')
    def after_loss(self): _sync_mode('default')
    after_cancel_batch = after_fit = after_loss

def gpu_sync_check(device='cuda', bs=64, n_batches=4):
    "Fit every mixaug callback (and options) on `device` with syncs raising inside each batch: name -> 'clean' or the error"
    x,y = batch(bs*n_batches, 32)
    x,y = x.to(device),y.to(device)
    cbs = {'MixUp': lambda: MixUp(), 'MixUp per_batch p=0.5': lambda: MixUp(per_batch=True, p=.5, seed=0),
           'CutMix': lambda: CutMix(), 'CutMix per_batch': lambda: CutMix(per_batch=True),
           'CutMixUp': lambda: CutMixUp(seed=0), 'CutMixUp per_sample': lambda: CutMixUp(per_sample=True, seed=1),
           'SemiMix': lambda: SemiMix(), 'SemiMix unlabeled': lambda: SemiMix(DataLoader(x[:2*bs].cpu(), bs=bs, shuffle=True, device=device))}
    res = {}
    for k,f in cbs.items():
        dls = DataLoaders(ViewDLs(x, y, bs), ViewDLs(x[:bs], y[:bs], bs), device=device)
        learn = quiet_learner(dls, Strided(3, 32, 32).to(device), loss_func=CrossEntropyLossFlat(), cbs=[f(), SyncError()])
        try:
            with learn.no_logging(): learn.fit(1)
            res[k] = 'clean'
        except Exception as e: res[k] = f'{type(e).__name__}: {e}'.split('\n')[0]
        finally: _sync_mode('default')
    return res

class ViewDLs(DataLoader):
    "Batches of `bs` slices of `x`, `y` kept on the device"
    def __init__(self, x, y, bs, **kwargs): self.x,self.y = x,y; super().__init__(range(len(x)), bs=bs, **kwargs)
    def create_batch(self, b): return self.x[b[0]:b[-1]+1],self.y[b[0]:b[-1]+1]

GPU = ['none', 'fastai MixUp', 'fastai CutMix', 'mixaug MixUp', 'mixaug MixUp per_batch', 'mixaug CutMix',
       'mixaug CutMix per_batch', 'timm MixUp batch', 'timm CutMix batch', 'timm CutMix elem',
       'torchvision MixUp', 'torchvision CutMix']

def gpu_overhead(sizes=(64,128,256,512), reps=50, device='cuda', size=224, log=print):
    "Per-batch time of `before_batch` plus the loss on `device`, minus that of no callback: median ms of device time (CUDA events) and host time"
    cuda = torch.device(device).type=='cuda'
    res = {}
    for bs in sizes:
        x,y = batch(bs, size)
        x,y = x.to(device),y.to(device)
        res[bs] = {}
        for k,(_,f) in contenders(GPU).items():
            cbs,lf = f()
            dls = DataLoaders(PoolDL(x, y, 1), PoolDL(x[:2], y[:2], 1), device=device)
            learn = quiet_learner(dls, Strided(3, size, size).to(device), loss_func=lf, cbs=cbs)
            learn.training,learn.pct_train,learn.epoch,learn.n_epoch,learn.iter = True,0.,0,1,0
            for cb in cbs: getattr(cb, 'before_train', lambda: None)()
            pred = torch.randn(bs, N_CLASSES, device=device)
            dev,host = [],[]
            for r in range(reps+5):
                learn.xb,learn.yb = (x.clone(),),(y.clone(),)
                if cuda: torch.cuda.synchronize(); s,e = torch.cuda.Event(enable_timing=True),torch.cuda.Event(enable_timing=True); s.record()
                t = time.perf_counter()
                learn('before_batch'); learn.pred = pred; learn('after_pred')
                learn.loss_func(learn.pred, *learn.yb); learn('after_loss')
                th = time.perf_counter()-t
                if cuda: e.record(); torch.cuda.synchronize()
                if r >= 5: host.append(1e3*th); dev.append(s.elapsed_time(e) if cuda else 1e3*(time.perf_counter()-t))
            res[bs][k] = dict(device_ms=float(np.median(dev)), host_ms=float(np.median(host)))
        for k,r in res[bs].items():
            if k!='none': r['device_ms'] -= res[bs]['none']['device_ms']; r['host_ms'] -= res[bs]['none']['host_ms']
        log(f'gpu bs={bs}: ' + ', '.join(f"{k} {r['device_ms']:.2f}ms" for k,r in res[bs].items()))
    return res

# ---- statistics: paired by round, bootstrap intervals over rounds ----

def boot_ci(v, stat=np.median, level=.95, n_boot=4000, seed=0) -> dict:
    "`stat` of `v` and its bootstrap percentile interval at `level` (resampling the values, i.e. the rounds): dict(est, lo, hi, n)"
    v = np.asarray(v, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))
    lo,hi = np.quantile(stat(v[idx], axis=1), [(1-level)/2, (1+level)/2])
    return dict(est=float(stat(v)), lo=float(lo), hi=float(hi), n=len(v))

def verdict(ci, one=1.) -> str:
    "'above' or 'below' where `ci`'s interval excludes `one`, else 'not resolved'"
    return 'above' if ci['lo'] > one else 'below' if ci['hi'] < one else 'not resolved'

def per_round(spans, n_batches) -> np.ndarray:
    "A contender's time in each round: the median of that round's `n_batches` batches (`spans` in fit order)"
    return np.median(np.asarray(spans, dtype=float).reshape(-1, n_batches), axis=1)

def paired_ratio(a, b, base) -> np.ndarray:
    "Per round, the overhead of `a` over that of `b`, each minus the same round's `base` time"
    a,b,base = (np.asarray(t, dtype=float) for t in (a, b, base))
    return (a-base)/(b-base)

REF = {'mixup':'fastai MixUp', 'cutmix':'fastai CutMix'}
LIKE = {'mixaug MixUp':'fastai MixUp', 'mixaug CutMix per_batch':'fastai CutMix'}  # the same work per batch as fastai's (per sample / one box)

def comparisons(kinds) -> list:
    "(contender, reference) pairs: every mixer against fastai's of its kind, and mixaug's against the gather+lerp floor"
    out = [(k,REF[v]) for k,v in kinds.items() if v in REF and k!=REF[v] and REF[v] in kinds]
    return out + [(k,'floor: gather+lerp') for k in ('mixaug MixUp','mixaug CutMix') if k in kinds and 'floor: gather+lerp' in kinds]

# ---- 1. overhead ----

def overhead(sizes, rounds, n_batches, include=None, log=print):
    "Per-batch spans (wall and thread CPU time) for every contender and batch size; each round fits one epoch of every contender, in a fresh random order"
    cs,res,secs = contenders(include),{},{}
    rng = random.Random(0)
    for bs in sizes:
        t0 = time.time()
        x,y = batch(bs)
        learners = {k:make_learner(f, x, y, n_batches) for k,(_,f) in cs.items()}
        for l in learners.values():
            with l.no_logging(): l.fit(1)  # warm-up
            l.rec['spans'].clear(); l.rec['cpu_spans'].clear()
        orders = []
        for r in range(rounds):
            order = list(learners); rng.shuffle(order); orders.append(order)
            for k in order:
                with learners[k].no_logging(): learners[k].fit(1)
        res[bs] = dict(wall={k:l.rec['spans'] for k,l in learners.items()}, cpu={k:l.rec['cpu_spans'] for k,l in learners.items()}, orders=orders)
        secs[bs] = time.time()-t0
        log(f'bs={bs}: ' + ', '.join(f'{k} {1e3*np.median(v):.1f}ms' for k,v in res[bs]['wall'].items()) + f' ({secs[bs]:.0f} s)')
    return res,secs

def summarise(raw, kinds, n_batches, clock='wall') -> dict:
    "Per batch size: each contender's overhead (ms, median over rounds with its interval), and the paired ratios of `comparisons`"
    out = {}
    for bs,d in raw.items():
        rt = {k:per_round(v, n_batches) for k,v in d[clock].items()}
        ov = {k:1e3*(t-rt['none']) for k,t in rt.items() if k!='none'}
        rows = {k:boot_ci(v) | dict(min_ms=float(1e3*(rt[k].min()-rt['none'].min()))) for k,v in ov.items()}
        ratios = {}
        for a,b in comparisons(kinds):
            ci = boot_ci(paired_ratio(rt[a], rt[b], rt['none']))
            diff = boot_ci(ov[a]-ov[b])  # the paired difference, ms
            ratios[f'{a} / {b}'] = ci | dict(verdict=verdict(ci), like_for_like=LIKE.get(a)==b, diff_ms=diff, diff_verdict=verdict(diff, 0.),
                                             min_ratio=rows[a]['min_ms']/rows[b]['min_ms'] if rows[b]['min_ms'] else None)
        out[bs] = dict(overhead_ms=rows, ratios=ratios)
    return out

# ---- 2. memory ----

def peak_extra_bytes(fn):
    "Peak of the bytes allocated and not yet freed while `fn` runs: torch profiler's allocator events, in time order"
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: fn()
    evs = sorted((e.start_ns(),e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name()=='[memory]')
    cur = peak = 0
    for _,b in evs: cur += b; peak = max(peak, cur)
    return peak

def memory(sizes, include=None, reps=5):
    "Peak extra memory while one training batch is mixed and its loss computed, in multiples of the input batch's bytes"
    res = {}
    for bs in sizes:
        x,y = batch(bs)
        res[bs] = {}
        for k,(_,f) in contenders(include).items():
            learn = make_learner(f, x, y, 1)
            learn.training,learn.pct_train,learn.epoch,learn.n_epoch,learn.iter = True,0.,0,1,0
            for cb in learn.cbs: getattr(cb, 'before_train', lambda: None)()  # the mixing callbacks' set-up (fastai's swaps the loss)
            peaks = []
            for _ in range(reps):
                b = (x.clone(),y.clone())
                def step():
                    learn._split(b); learn('before_batch')
                    learn.pred = torch.zeros(bs, N_CLASSES, requires_grad=True); learn('after_pred')
                    learn.loss_func(learn.pred, *learn.yb); learn('after_loss')
                    learn.xb = learn.yb = learn.pred = None  # what fit frees at the end of the batch
                peaks.append(peak_extra_bytes(step))
                del b
            res[bs][k] = float(np.median(peaks))/(x.numel()*x.element_size())
    return res

# ---- 3. end-to-end throughput ----

def small_cnn():
    "A small CNN for 3x32x32 images: three 3x3 convolutions with pooling, then a linear layer"
    return nn.Sequential(nn.Conv2d(3,16,3,padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16,32,3,padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(32,64,3,padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, N_CLASSES))

THROUGHPUT = ['none', 'fastai MixUp', 'fastai CutMix', 'mixaug MixUp', 'mixaug CutMix', 'mixaug CutMix per_batch',
              'timm MixUp batch', 'timm CutMix elem', 'torchvision MixUp', 'torchvision CutMix']

def throughput(bs, rounds, n_batches, include=None, log=print):
    "Samples/s of a small CNN on 3x32x32 images per contender, epochs interleaved in a fresh random order each round; ratios to no callback paired by round"
    x,y = batch(bs, 32)
    cs = {k:v for k,v in contenders(include).items() if k in THROUGHPUT}
    learners = {k:make_learner(f, x, y, n_batches, model=small_cnn()) for k,(_,f) in cs.items()}
    times,cpu = {k:[] for k in learners},{k:[] for k in learners}
    for l in learners.values():
        with l.no_logging(): l.fit(1, 1e-3)
    rng = random.Random(1)
    for r in range(rounds):
        order = list(learners); rng.shuffle(order)
        for k in order:
            with learners[k].no_logging():
                t,c = time.perf_counter(),time.process_time(); learners[k].fit(1, 1e-3)
                times[k].append(time.perf_counter()-t); cpu[k].append(time.process_time()-c)
    n = bs*n_batches
    out = {}
    for k in learners:
        out[k] = dict(median=n/np.median(times[k]), max=n/np.min(times[k]), cpu_median=n/np.median(cpu[k]),
                      ratio=boot_ci(np.array(times['none'])/np.array(times[k])),  # samples/s over those of no callback, per round
                      ratio_cpu=boot_ci(np.array(cpu['none'])/np.array(cpu[k])), seconds=times[k], cpu_seconds=cpu[k])
    log('throughput: ' + ', '.join(f"{k} {v['ratio']['est']:.3f}" for k,v in out.items()))
    return out

# ---- environment ----

def versions():
    fx,why = fastxtend_callbacks()
    import importlib.metadata as md
    def ver(p):
        try: return md.version(p)
        except Exception: return None
    return dict(python=platform.python_version(), torch=torch.__version__, fastai=fastai.__version__, timm=timm.__version__,
                torchvision=torchvision.__version__, numpy=np.__version__, mixaug=mixaug.__version__, fastxtend=ver('fastxtend'), fastxtend_error=why)

def cpu_name():
    try: return [l.split(':',1)[1].strip() for l in subprocess.run(['lscpu'], capture_output=True, text=True).stdout.splitlines()
                 if l.startswith('Model name')][0]
    except Exception: return platform.processor()

def now(): return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', default='32,64,128,256')
    p.add_argument('--rounds', type=int, default=20, help='rounds (one epoch of every contender each) per batch size in the overhead fits')
    p.add_argument('--batches', type=int, default=4, help='batches per epoch in the overhead fits')
    p.add_argument('--tp_rounds', type=int, default=10, help='rounds in the throughput fits')
    p.add_argument('--include', default=None, help='comma-separated contender names (default: all)')
    p.add_argument('--threads', type=int, default=2, help='torch threads (the machines have 2 cores)')
    p.add_argument('--skip', default='', help='comma-separated parts to skip: counts,overhead,memory,throughput')
    p.add_argument('--gpu', action='store_true', help='instead: the GPU checks and timings, into nbs/benchmark_gpu.json')
    p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'nbs', 'benchmark_results.json'))
    argv = argv if argv is not None else sys.argv[1:]
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads); torch.manual_seed(0); np.random.seed(0)
    if a.gpu: return main_gpu()
    t0 = time.time()
    sizes = [int(s) for s in a.sizes.split(',')]
    inc = a.include.split(',') if a.include else None
    clock = 'cpu' if a.threads==1 else 'wall'  # a thread's CPU time is the batch's work only with 1 thread
    meta = dict(command=' '.join(['python tools/benchmark.py']+list(argv)), date=now(), git=git_state() | engine_match(),
                versions=versions(), cpu=cpu_name(), cores=os.cpu_count(), threads_per_process=a.threads, workers=1,
                load_avg_before=list(os.getloadavg()), clock=clock,
                settings=dict(sizes=sizes, rounds=a.rounds, batches=a.batches, image='3x128x128', counts_bs=64, tp_rounds=a.tp_rounds,
                              tp_bs=128, tp_image='3x32x32', tp_batches=4, n_boot=4000, level=.95, include=inc, skip=a.skip),
                smoke=a.sizes!='32,64,128,256' or a.rounds<10 or a.tp_rounds<5 or bool(a.include) or bool(a.skip), part_seconds={})
    kinds = {k:v[0] for k,v in contenders(inc).items()}
    res = dict(meta=meta, kinds=kinds)
    part = meta['part_seconds']
    def timed(name, f, *args):
        t = time.time(); o = f(*args); part[name] = time.time()-t; return o
    if 'counts' not in a.skip: res['counts'] = timed('counts', counts, 64, 128, inc)
    if 'overhead' not in a.skip:
        raw,secs = overhead(sizes, a.rounds, a.batches, inc)
        part |= {f'overhead bs {bs}':v for bs,v in secs.items()}
        res['overhead_raw_ms'] = {bs:{c:{k:[1e3*t for t in v] for k,v in d[c].items()} for c in ('wall','cpu')} | dict(orders=d['orders'])
                                  for bs,d in raw.items()}
        res['overhead'] = summarise(raw, kinds, a.batches, clock)
    if 'memory' not in a.skip: res['memory'] = timed('memory', memory, sizes, inc); print('memory', res['memory'])
    if 'throughput' not in a.skip: res['throughput'] = timed('throughput', throughput, 128, a.tp_rounds, 4, inc)
    meta |= dict(load_avg_after=list(os.getloadavg()), git_after=git_state() | engine_match(), sources=loaded_sources(),
                 seconds=time.time()-t0, date_end=now())
    with open(a.out, 'w') as f: json.dump(res, f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")
    return res

def main_gpu(out=os.path.join(os.path.dirname(__file__), '..', 'nbs', 'benchmark_gpu.json')):
    "The GPU part: fits with syncs raising, then the overhead table at 3x224x224"
    t0 = time.time()
    meta = dict(command='python tools/benchmark.py --gpu', date=now(), git=git_state() | engine_match(), versions=versions(), cpu=cpu_name(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (a smoke run)', threads_per_process=torch.get_num_threads())
    res = dict(meta=meta, sync_clean=gpu_sync_check(), overhead=gpu_overhead())
    meta |= dict(git_after=git_state() | engine_match(), sources=loaded_sources(), seconds=time.time()-t0)
    with open(out, 'w') as f: json.dump(res, f, indent=1)
    print('wrote', os.path.abspath(out))
    return res

if __name__ == '__main__': main()
