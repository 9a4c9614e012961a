"""The mixup paper's label-noise experiment (Zhang et al. 2018, section 3.4) on scikit-learn's digits.

One command: `python tools/label_noise.py` corrupts the labels of 1,200 digits at 20%, 50% and 80% (each wrong label
any other class, uniformly), keeps 200 of them, their labels as noisy as the rest, to validate, trains an MLP on the
other 1,000 with ERM, mixaug's MixUp (alpha 1 and 8), CutMix and SemiMix, and fastai's MixUp(8) as a reference, 3 paired
seeds: for a seed, every method gets the same split, corruption, initial weights and batches (each mixaug callback draws
from a generator of its own). After every epoch it measures the accuracy and loss on the (noisy) validation digits, the
accuracy on the 597 clean test digits, and how many wrong training labels the net reproduces; the epoch is chosen on
validation only. A few runs are made twice, to show the runs repeat to the last digit. Results, with their summary, the
git commit, the hash of every source file that ran and each run's wall time, go to `nbs/label_noise_results.json`
(shown by `nbs/06_label_noise.ipynb`). No download: the digits ship with scikit-learn.
"""
from __future__ import annotations
import argparse, datetime, json, multiprocessing as mp, os, platform, sys, time, warnings
import numpy as np, torch, torch.nn as nn
from sklearn.datasets import load_digits
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
import fastai.callback.mixup as fmix
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the mask-family experiment's helpers, one copy for every evidence tool (`TensorDL` is imported from here by others)
from mask_family import (sha, TensorDL, Measure, mean_sd, paired, select_epoch, selected, test_picked, git_state, engine_match,
                         loaded_sources)
from mixaug.callbacks import MixUp, CutMix
from mixaug.semimix import SemiMix

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N_TRAIN,N_VAL = 1200,200  # noisy digits: the first 1,000 train, the last 200 validate; the other 597 (clean) test

# ---------------------------------------------------------------- data
def noisy_digits(noise:float, seed:int, n_train:int=N_TRAIN):
    "Digits `(x, y)` as (n,1,8,8) in [0,1]: `n_train` training digits of which exactly `noise` have a wrong label, the clean rest for testing"
    X,y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))  # a new split for each seed
    X,y = torch.tensor(X[order], dtype=torch.float32).view(-1,1,8,8)/16,torch.tensor(y[order])
    clean = y[:n_train]
    flip = torch.tensor(rng.choice(n_train, round(noise*n_train), replace=False), dtype=torch.long)
    noisy = clean.clone()
    noisy[flip] = (clean[flip] + torch.tensor(rng.integers(1, 10, len(flip)))) % 10  # symmetric: any other class, uniformly
    return (X[:n_train],noisy),(X[n_train:],y[n_train:]),clean

def noisy_splits(noise:float, seed:int, n_val:int=N_VAL, n_train:int=N_TRAIN) -> dict:
    "`noisy_digits` cut in three: `train` and `valid` (its last `n_val`, labels corrupted like the rest), the clean `test`; `clean_*`: the true labels"
    if not 0 < n_val < n_train: raise ValueError(f"`n_val` must be in (0, {n_train}); got {n_val!r}")
    (x,y),test,clean = noisy_digits(noise, seed, n_train)
    k = n_train-n_val
    return dict(train=(x[:k],y[:k]), valid=(x[k:],y[k:]), test=test, clean_train=clean[:k], clean_valid=clean[k:])

def mlp() -> nn.Module:
    "The MLP 64-512-512-10 of the effect anchor; it takes digits as (n,1,8,8), so CutMix can cut them"
    return nn.Sequential(nn.Flatten(), nn.Linear(64,512), nn.ReLU(), nn.Linear(512,512), nn.ReLU(), nn.Linear(512,10))

# ---------------------------------------------------------------- measuring memorisation
class Memorised(Callback):
    "After each epoch: of the training digits whose label is wrong, the share the net predicts as that wrong label; of all, the share predicted as the true one"
    order = 11
    def __init__(self, x, y, clean): self.x,self.y,self.clean = x,y,clean
    def before_fit(self): self.fits_wrong,self.train_acc_clean = [],[]
    def after_epoch(self):
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(): pred = self.model(self.x).argmax(1)
        finally: self.model.train(was)
        wrong = self.y!=self.clean
        self.fits_wrong.append(float((pred[wrong]==self.y[wrong]).double().mean()) if wrong.any() else float('nan'))
        self.train_acc_clean.append(float((pred==self.clean).double().mean()))

# ---------------------------------------------------------------- methods: each mixaug callback with its own seeded generator
METHODS = {
    'ERM': lambda seed: None,
    'MixUp(1)': lambda seed: MixUp(alpha=1., seed=seed),
    'MixUp(8)': lambda seed: MixUp(alpha=8., seed=seed),
    'CutMix(1)': lambda seed: CutMix(alpha=1., seed=seed),
    'SemiMix(1)': lambda seed: SemiMix(unlabeled=None, alpha=1., seed=seed),
    'fastai MixUp(8)': lambda seed: fmix.MixUp(alpha=8.),  # draws from torch's global generator: its batches are still the others'
}

def train(make, cbs, d:dict, seed:int, epochs:int, lr:float, bs:int):
    "Fit `make()` on `d['train']` (fit_one_cycle, validating on `d['valid']`); the per-epoch numbers of `Measure` and `Memorised` and the init hash"
    set_seed(seed, reproducible=True)
    model = make()
    init = sha(*model.state_dict().values())
    (xt,yt) = d['train']
    dls = DataLoaders(TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), TensorDL(*d['valid'], bs=1024))
    m,mem = Measure(d['valid'], d['test']),Memorised(xt, yt, d['clean_train'])
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=[m, mem]+[c for c in cbs if c is not None])
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    with learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    e = select_epoch(m.val_acc, m.val_loss)
    return dict(val_acc=m.val_acc, val_loss=m.val_loss, test_acc=m.test_acc, test_loss=m.test_loss,
                recorder_val_acc=[float(v[2]) for v in learn.recorder.values], fits_wrong=mem.fits_wrong, train_acc_clean=mem.train_acc_clean,
                selected_epoch=e, selected_test_acc=m.test_acc[e], last_test_acc=m.test_acc[-1],
                selected_fits_wrong=mem.fits_wrong[e], last_fits_wrong=mem.fits_wrong[-1], n_train=len(xt), n_val=len(d['valid'][0]),
                n_test=len(d['test'][0]), noise_train=float((yt!=d['clean_train']).double().mean()),
                noise_valid=float((d['valid'][1]!=d['clean_valid']).double().mean()),
                split_sha=sha(*d['train'], *d['valid'], *d['test']), init_sha=init, batches_sha=m.h.hexdigest()[:12])

def run(method:str, noise:float, seed:int, epochs:int=60, lr:float=3e-3, bs:int=64) -> dict:
    "Train the MLP with `method` on digits with `noise` wrong labels; the per-epoch validation, test and memorisation numbers, the epoch chosen on validation, hashes of what was paired"
    start = time.perf_counter()
    torch.set_num_threads(1)
    r = train(mlp, [METHODS[method](seed)], noisy_splits(noise, seed), seed, epochs, lr, bs)
    return dict(method=method, noise=noise, seed=seed, **r, seconds=time.perf_counter()-start)

def _run(args): return run(*args)

# ---------------------------------------------------------------- statistics
def summarise(rows:list, base:str='ERM') -> dict:
    "For each noise and method: test accuracy (at the epoch chosen on validation; at the last) and the wrong labels reproduced, mean ± sd, and minus `base`, paired by seed"
    out = {}
    for n in dict.fromkeys(r['noise'] for r in rows):
        rs = [r for r in rows if r['noise']==n]
        out[str(n)] = {}
        for m in dict.fromkeys(r['method'] for r in rs):
            o = out[str(n)][m] = {}
            for k in ('selected_test_acc','last_test_acc','selected_fits_wrong','last_fits_wrong'):
                v = {r['seed']: r[k] for r in rs if r['method']==m}
                ref = {r['seed']: r[k] for r in rs if r['method']==base}
                o[k] = dict(mean_sd([v[s] for s in sorted(v)]), vs_base=paired(v, ref) if m!=base else None)
        out[str(n)]['test_picked'] = test_picked([dict(r, dataset='digits') for r in rs])['digits']
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--noises', default='0.2,0.5,0.8')
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=60)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--repeat', default='0.8:0', help='noise:seed whose runs (every method) are made a second time; empty: none')
    p.add_argument('--out', default=os.path.join(ROOT, 'nbs', 'label_noise_results.json'))
    a = p.parse_args(argv)
    start = time.time()
    git = git_state() | engine_match()
    methods,noises,seeds = a.methods.split(','),[float(n) for n in a.noises.split(',')],list(range(a.seeds))
    jobs = [(m,n,s,a.epochs) for n in noises for s in seeds for m in methods]
    rep = [(m,float(a.repeat.split(':')[0]),int(a.repeat.split(':')[1]),a.epochs) for m in methods] if a.repeat else []
    rows = []
    with mp.get_context('fork').Pool(a.workers) as pool:
        for r in pool.imap_unordered(_run, jobs+rep):
            rows.append(r)
            print(f"{len(rows)}/{len(jobs+rep)} {r['method']} noise={r['noise']} seed={r['seed']}: test {r['selected_test_acc']:.3f} at epoch "
                  f"{r['selected_epoch']+1} (chosen on validation), {r['last_test_acc']:.3f} last ({r['seconds']:.0f} s)", flush=True)
    key = {j[:3]:i for i,j in enumerate(jobs)}
    first,repeat,seen = [],[],set()
    for r in rows:  # the first of each job to come back is the run; the second (a repeat) is the check
        k = (r['method'],r['noise'],r['seed'])
        (repeat if k in seen else first).append(r); seen.add(k)
    first.sort(key=lambda r: key[(r['method'],r['noise'],r['seed'])]); repeat.sort(key=lambda r: key[(r['method'],r['noise'],r['seed'])])
    import fastai, mixaug, sklearn
    meta = dict(command=' '.join(['python tools/label_noise.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), git=git, git_after=git_state() | engine_match(),
                sources=loaded_sources(), seconds=time.time()-start, run_seconds=sum(r['seconds'] for r in rows), workers=a.workers,
                threads_per_process=1, torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, sklearn=sklearn.__version__,
                python=platform.python_version(), methods=methods, noises=noises, seeds=seeds, epochs=a.epochs, lr=3e-3, bs=64,
                optimiser='Adam, fit_one_cycle', n_train=N_TRAIN-N_VAL, n_val=N_VAL, repeat=a.repeat,
                smoke=a.epochs!=60 or a.seeds!=3 or noises!=[.2,.5,.8] or methods!=list(METHODS))
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, summary=summarise(first), rows=first, repeat=repeat), f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
