"""SemiMix on scikit-learn's digits: 100 labeled digits (10 per class), the other 1,100 of the pool unlabeled.

One command: `python tools/semimix_digits.py` trains the same MLP four ways (supervised on the labeled digits, mixaug's
MixUp, SemiMix with partners from the labeled batch, SemiMix with partners from the unlabeled digits), 5 seeds, and
writes the test accuracy at the end of training, each run's wall time, the git commit and the sources that ran to
`nbs/semimix_digits_results.json`, shown by `nbs/02a_semimix_digits.ipynb`. No download: the digits ship with
scikit-learn. For a seed, every method gets the same labeled subset, the same initial weights and the same batches.
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, os, platform, sys, time, warnings
import numpy as np, torch, torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
import fastai.callback.progress  # `Learner.no_bar`
from mixaug.callbacks import MixUp
from mixaug.semimix import SemiMix

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mask_family import sha, mean_sd, paired, git_state, engine_match, loaded_sources

warnings.filterwarnings('ignore')
N_TEST,PER_CLASS = 597,10
METHODS = ['supervised', 'MixUp', 'SemiMix(None)', 'SemiMix(unlabeled)']

def digits() -> tuple:
    "All 1,797 digits as (n, 64) floats in [0, 1], their labels, and the fixed stratified (pool, test) index split"
    X,y = load_digits(return_X_y=True)
    X,y = torch.tensor(X/16., dtype=torch.float32),torch.tensor(y)
    pool,test = train_test_split(np.arange(len(X)), test_size=N_TEST, stratify=y.numpy(), random_state=0)
    return X,y,pool,test

def split(y, pool, seed:int, per_class:int=PER_CLASS) -> tuple:
    "Indices of `per_class` labeled digits per class drawn from `pool` with `seed`, and of the unlabeled rest of the pool"
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    lab = np.concatenate([rng.choice(pool[y[pool]==c], per_class, replace=False) for c in range(10)])
    return lab,np.setdiff1d(pool, lab)

def mlp() -> nn.Module: return nn.Sequential(nn.Linear(64,256), nn.ReLU(), nn.Linear(256,256), nn.ReLU(), nn.Linear(256,10))

def callbacks(method:str, seed:int, unlabeled) -> list:
    "The callbacks of `method` (each mixing callback with its own generator, seeded; `alpha=0.4`, their default)"
    return {'supervised': lambda: [], 'MixUp': lambda: [MixUp(seed=seed)], 'SemiMix(None)': lambda: [SemiMix(seed=seed)],
            'SemiMix(unlabeled)': lambda: [SemiMix(unlabeled, seed=seed)]}[method]()

class HashBatches(Callback):
    "A hash of the training targets in the order the loader gives them, before any mixing"
    order = 10
    def before_fit(self): self.h = hashlib.sha1()
    def before_batch(self):
        if self.training: self.h.update(self.yb[0].numpy().tobytes())

def run(method:str, seed:int, reps:int=10, epochs:int=8, lr:float=3e-3, bs:int=32) -> dict:
    "Train `method` on the labeled split of `seed`; the test accuracy at the end of training, and hashes of what was paired"
    start = time.perf_counter()
    torch.set_num_threads(1)
    X,y,pool,test = digits()
    lab,unl = split(y, pool, seed)
    set_seed(seed)
    model = mlp()
    init = sha(*model.state_dict().values())
    # an epoch is `reps` passes over the 100 labeled digits, so the test set is scored only `epochs` times
    train = DataLoader(list(zip(X[lab],y[lab]))*reps, bs=bs, shuffle=True)
    dls = DataLoaders(train, DataLoader(list(zip(X[test],y[test])), bs=600))
    hb = HashBatches()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=[hb]+callbacks(method, seed, X[unl]))
    with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(epochs, lr)
    with torch.no_grad(): acc = float((learn.model.eval()(X[test]).argmax(1)==y[test]).double().mean())
    return dict(method=method, seed=seed, test_acc=acc, n_labeled=len(lab), n_unlabeled=len(unl), n_test=len(test),
                steps=len(train)*epochs, split_sha=sha(X[lab], y[lab], X[unl], X[test]), init_sha=init,
                batches_sha=hb.h.hexdigest()[:12], seconds=time.perf_counter()-start)

def summarise(rows:list, base:str='supervised') -> dict:
    "Per method: test accuracy mean ± sd (and min, max), and minus `base` paired by seed"
    out = {}
    for m in dict.fromkeys(r['method'] for r in rows):
        acc = {r['seed']: r['test_acc'] for r in rows if r['method']==m}
        ref = {r['seed']: r['test_acc'] for r in rows if r['method']==base}
        d = paired(acc, ref) if m!=base else None
        out[m] = dict(test_acc=mean_sd([acc[s] for s in sorted(acc)]), min=min(acc.values()), max=max(acc.values()), vs_base=d,
                      seeds_above_base=None if d is None else sum(v > 0 for v in d['values']),
                      seeds_below_base=None if d is None else sum(v < 0 for v in d['values']))
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--out', default=os.path.join(HERE, '..', 'nbs', 'semimix_digits_results.json'))
    a = p.parse_args(argv)
    start,git = time.time(),git_state() | engine_match()
    rows = []
    for s in range(a.seeds):
        for m in METHODS:
            rows.append(run(m, s))
            print(f"{m} seed={s}: test {rows[-1]['test_acc']:.3f} ({rows[-1]['seconds']:.1f} s)", flush=True)
    import fastai, mixaug
    meta = dict(command=' '.join(['python tools/semimix_digits.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), git=git,
                git_after=git_state() | engine_match(), sources=loaded_sources(), seconds=time.time()-start,
                run_seconds=sum(r['seconds'] for r in rows), threads_per_process=1, workers=1, torch=torch.__version__,
                fastai=fastai.__version__, mixaug=mixaug.__version__, python=platform.python_version(), methods=METHODS,
                seeds=list(range(a.seeds)), alpha=.4, lr=3e-3, bs=32, epochs=8, reps=10, per_class=PER_CLASS, n_test=N_TEST,
                optimiser='Adam, fit_one_cycle')
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, summary=summarise(rows), rows=rows), f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
