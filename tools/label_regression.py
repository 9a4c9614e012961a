"""C-Mixup against MixUp and ERM for regression: scikit-learn's diabetes data and a 1-D step where mixup's labels are wrong.

One command: `python tools/label_regression.py` trains a small MLP with an MSE loss (fastai's `MSELossFlat`) with no mixing
(ERM), with `MixUp()` and with `CMixup(sigma=s)` for each `s` of a small grid, 3 paired seeds: for a seed, every method
gets the same random train / validation / test split, the same initial weights and the same batches (each mixing callback
draws from a generator of its own). Inputs and targets are standardised with the training split's mean and standard
deviation. After every epoch it measures the RMSE on the validation and test splits (in units of the training targets'
standard deviation); the epoch, and CMixup's sigma, are chosen on validation only. Results, with their summary (mean,
standard deviation and the paired differences CMixup - MixUp and CMixup - ERM), the git commit, whether the tree was
clean, each mixaug file's hash and each run's wall time, go to `nbs/regression_results.json`, shown by
`nbs/12_regression_evidence.ipynb`. No download: the diabetes data ship with scikit-learn; the step is generated.
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, math, os, platform, subprocess, sys, time, warnings
import numpy as np, torch, torch.nn as nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.losses import MSELossFlat
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the mask-family experiment's helpers, one copy for every evidence tool: value hashes, in-memory batches, paired
# statistics, and whether the imported mixaug is the commit's
from mask_family import sha, TensorDL, mean_sd, paired, engine_match
from mixaug.callbacks import MixUp
from mixaug.label_aware import CMixup

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---------------------------------------------------------------- data
def random_split(n:int, n_val:int, n_test:int, seed:int) -> tuple:
    "Index arrays (train, valid, test), disjoint and covering `range(n)`, drawn at random for `seed`"
    if n_val < 1 or n_test < 1 or n_val+n_test >= n: raise ValueError(
        f"`n_val` and `n_test` must be >= 1 and leave training samples out of {n}; got n_val={n_val!r}, n_test={n_test!r}")
    p = np.random.default_rng(seed).permutation(n)
    return np.sort(p[n_val+n_test:]),np.sort(p[:n_val]),np.sort(p[n_val:n_val+n_test])

def step_fn(x):
    "The synthetic target without noise: a steep step at 0 (width 0.05) on a slope, so distant inputs have distant labels across it"
    return np.tanh(x/.05) + .5*x

def make_step(n:int=1400, noise:float=.1, seed:int=1234) -> tuple:
    "`n` inputs uniform in [-1, 1] and targets `step_fn(x)` plus Gaussian noise of sd `noise`; the same data for every run seed"
    r = np.random.default_rng(seed)
    x = r.uniform(-1, 1, n)
    return x[:,None],step_fn(x) + noise*r.standard_normal(n)

def load(ds:str) -> tuple:
    "Inputs (n, d) and targets (n,) of data set `ds`, as float64 arrays, unscaled"
    if ds=='diabetes':
        from sklearn.datasets import load_diabetes
        return load_diabetes(return_X_y=True)
    if ds=='step': return make_step()
    raise ValueError(f"`ds` must be one of {list(DATASETS)}; got {ds!r}")

# data set: (n_val, n_test, epochs); what is left trains. The step trains on 200 points: few enough that what the mix adds matters
DATASETS = {'diabetes': dict(n_val=80, n_test=100, epochs=60), 'step': dict(n_val=200, n_test=1000, epochs=60)}

def standardise(train, *others) -> tuple:
    "Each array minus the training array's mean, over its standard deviation (per column; population sd); the training statistics too"
    mu,sd = train.mean(0),train.std(0)
    sd = np.where(sd > 0, sd, 1.)
    return tuple((a-mu)/sd for a in (train,)+others),(mu,sd)

def data(ds:str, seed:int, n_val:int|None=None, n_test:int|None=None) -> dict:
    "`dict(train=(x,y), valid=(x,y), test=(x,y))` as float32 tensors: the split of `ds` for `seed`, standardised by its training part"
    X,y = load(ds)
    c = DATASETS[ds]
    ix = random_split(len(y), n_val or c['n_val'], n_test or c['n_test'], seed)
    xs,_ = standardise(*(X[i] for i in ix))
    ys,(ymu,ysd) = standardise(*(y[i] for i in ix))
    d = {k: (torch.tensor(a, dtype=torch.float32),torch.tensor(b, dtype=torch.float32)) for k,a,b in zip(('train','valid','test'), xs, ys)}
    d['y_sd'] = float(ysd)  # the training targets' sd: one unit of the RMSE, in the data's own units
    return d

def mlp(n_in:int, width:int=64) -> nn.Module:
    "Two hidden layers of `width` ReLU units, one output"
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))

# ---------------------------------------------------------------- methods: the callbacks' defaults, CMixup with sigma from a grid
SIGMAS = (.1, .3, 1.)  # in units of the training targets' sd
METHODS = {'ERM': lambda seed: None, 'MixUp': lambda seed: MixUp(seed=seed)}
METHODS |= {f'CMixup(sigma={s:g})': (lambda s: lambda seed: CMixup(sigma=s, seed=seed))(s) for s in SIGMAS}
CMIXUP = [m for m in METHODS if m.startswith('CMixup')]

def settings(method:str) -> dict:
    "The settings of `method`'s callback as made here, for the record"
    cb = METHODS[method](0)
    return {} if cb is None else {k: getattr(cb, k) for k in ('alpha','fold','per_batch','partners','sigma','p','stop_at')}

# ---------------------------------------------------------------- measuring
@torch.no_grad()
def rmse(model, x, y) -> float:
    "Root mean squared error of `model` in eval mode on `(x, y)` (its mode is put back), in float64"
    was = model.training
    model.eval()
    try: out = model(x).view(-1)
    finally: model.train(was)
    return float((out.double()-y.double()).square().mean().sqrt())

class Measure(Callback):
    "After each epoch, the RMSE on the validation and test splits; a hash of the training batches, as they come before any mixing"
    order = 10  # before the mixers' `before_batch` (90): the batches as the loader gave them
    def __init__(self, valid, test): self.valid,self.test = valid,test
    def before_fit(self): self.val_rmse,self.test_rmse,self.h = [],[],hashlib.sha1()
    def before_batch(self):
        if self.training: self.h.update(self.xb[0].numpy().tobytes()); self.h.update(self.yb[0].numpy().tobytes())
    def after_epoch(self):
        self.val_rmse.append(rmse(self.model, *self.valid)); self.test_rmse.append(rmse(self.model, *self.test))

def select_epoch(val_rmse) -> int:
    "The epoch (from 0) with the lowest validation RMSE; ties to the earlier epoch"
    if not len(val_rmse): raise ValueError("`val_rmse` must not be empty")
    return min(range(len(val_rmse)), key=lambda i: (val_rmse[i], i))

def selected(row:dict) -> tuple[int,float]:
    "The epoch of `row` chosen on its validation RMSE, and the test RMSE there"
    e = select_epoch(row['val_rmse'])
    return e,row['test_rmse'][e]

def run(ds:str, method:str, seed:int, epochs:int|None=None, n_train:int|None=None, lr:float=3e-3, bs:int=32) -> dict:
    "Train `method` on `ds` with `seed`; the per-epoch validation and test RMSE, the epoch chosen on validation, and hashes of what was paired"
    start = time.perf_counter()
    torch.set_num_threads(1)
    d = data(ds, seed)
    xt,yt = d['train']
    if n_train: xt,yt = xt[:n_train],yt[:n_train]
    set_seed(seed, reproducible=True)
    model = mlp(xt.shape[1])
    init = sha(*model.state_dict().values())
    dls = DataLoaders(TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), TensorDL(*d['valid'], bs=1000))
    m = Measure(d['valid'], d['test'])
    cb = METHODS[method](seed)
    learn = Learner(dls, model, loss_func=MSELossFlat(), cbs=[m]+([cb] if cb is not None else []))
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    with learn.no_logging(): learn.fit_one_cycle(epochs or DATASETS[ds]['epochs'], lr)
    e = select_epoch(m.val_rmse)
    return dict(dataset=ds, method=method, seed=seed, val_rmse=m.val_rmse, test_rmse=m.test_rmse,
                recorder_val_mse=[float(v[1]) for v in learn.recorder.values], selected_epoch=e,
                selected_test_rmse=m.test_rmse[e], last_test_rmse=m.test_rmse[-1], n_train=len(xt), y_sd=d['y_sd'],
                split_sha=sha(*d['train'], *d['valid'], *d['test']), init_sha=init, batches_sha=m.h.hexdigest()[:12],
                seconds=time.perf_counter()-start)

# ---------------------------------------------------------------- statistics

def pick_cmixup(rows:list, ds:str, seed:int) -> dict:
    "The CMixup run of `ds` and `seed` whose chosen epoch has the lowest validation RMSE over the sigma grid (ties to the smaller sigma)"
    rs = [r for r in rows if r['dataset']==ds and r['seed']==seed and r['method'] in CMIXUP]
    if not rs: raise ValueError(f"no CMixup run for {ds!r}, seed {seed}")
    return min(rs, key=lambda r: (r['val_rmse'][selected(r)[0]], settings(r['method'])['sigma']))

COMPARED = ('ERM', 'MixUp', 'CMixup')  # CMixup: its sigma and epoch chosen on validation, per seed

def summarise(rows:list) -> dict:
    "For each data set: the test RMSE (chosen epoch) of ERM, MixUp and CMixup (sigma chosen on validation), mean ± sd, the sigmas chosen, and the paired differences"
    out = {}
    for ds in dict.fromkeys(r['dataset'] for r in rows):
        seeds = sorted({r['seed'] for r in rows if r['dataset']==ds})
        pick = {s: pick_cmixup(rows, ds, s) for s in seeds}
        t = {m: {s: selected(next(r for r in rows if r['dataset']==ds and r['seed']==s and r['method']==m))[1] for s in seeds} for m in ('ERM','MixUp')}
        t['CMixup'] = {s: selected(pick[s])[1] for s in seeds}
        grid = {m: mean_sd([selected(r)[1] for r in rows if r['dataset']==ds and r['method']==m]) for m in CMIXUP}
        out[ds] = dict(test_rmse={m: mean_sd([t[m][s] for s in seeds]) for m in COMPARED},
                       sigma_chosen=[settings(pick[s]['method'])['sigma'] for s in seeds], grid_test_rmse=grid,
                       cmixup_minus_mixup=paired(t['CMixup'], t['MixUp']), cmixup_minus_erm=paired(t['CMixup'], t['ERM']),
                       mixup_minus_erm=paired(t['MixUp'], t['ERM']), seeds=seeds)
    return out

# ---------------------------------------------------------------- provenance
ENGINE = ('mixaug/', 'nbs/00_core.ipynb', 'nbs/00b_partners.ipynb', 'nbs/00c_methods.ipynb', 'nbs/01_callbacks.ipynb', 'nbs/01b_label_aware.ipynb')

def git_state(root:str=ROOT, engine:tuple=ENGINE) -> dict:
    "The commit, and whether tracked files (all; the engine: mixaug/ and the notebooks it is made from) differ from it, or the engine has untracked files"
    def git(*a): return subprocess.run(['git', '-C', root, *a], capture_output=True, text=True, check=True).stdout
    dirty = [l[3:] for l in git('status', '--porcelain', '--untracked-files=no').splitlines()]
    untracked_engine = [l[3:] for l in git('status', '--porcelain', '--', *engine).splitlines() if l.startswith('??')]
    return dict(commit=git('rev-parse', 'HEAD').strip(), tracked_clean=not dirty, dirty_tracked=dirty,
                engine_clean=not any(p.startswith(engine) for p in dirty) and not untracked_engine,
                untracked_engine=untracked_engine)

def source_sha1() -> dict:
    "A short sha1 of each .py file of the mixaug imported here"
    import mixaug
    d = os.path.dirname(mixaug.__file__)
    return {f: hashlib.sha1(open(os.path.join(d, f), 'rb').read()).hexdigest()[:10] for f in sorted(os.listdir(d)) if f.endswith('.py')}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--datasets', default=','.join(DATASETS))
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=None, help="override every data set's epochs (smoke runs)")
    p.add_argument('--n_train', type=int, default=None, help='use only this many of the training split (smoke runs)')
    p.add_argument('--out', default=os.path.join(ROOT, 'nbs', 'regression_results.json'))
    a = p.parse_args(argv)
    start = time.time()
    torch.set_num_threads(1)
    git,src = git_state() | engine_match(),source_sha1()
    dss,methods,seeds = a.datasets.split(','),a.methods.split(','),list(range(a.seeds))
    jobs = [(d,m,s) for d in dss for s in seeds for m in methods]
    rows = []
    for d,m,s in jobs:  # one process, one thread: the machine is shared
        r = run(d, m, s, a.epochs, a.n_train)
        rows.append(r)
        print(f"{len(rows)}/{len(jobs)} {d} {m} seed={s}: test RMSE {r['selected_test_rmse']:.3f} at epoch {r['selected_epoch']+1} "
              f"(chosen on validation), {r['last_test_rmse']:.3f} last ({r['seconds']:.1f} s)", flush=True)
    import fastai, mixaug, sklearn
    meta = dict(command=' '.join(['python tools/label_regression.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), git=git, git_after=git_state() | engine_match(),
                mixaug_source_sha1=src, mixaug_source_sha1_after=source_sha1(),
                seconds=time.time()-start, run_seconds=sum(r['seconds'] for r in rows), workers=1, threads_per_process=1,
                torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, sklearn=sklearn.__version__,
                python=platform.python_version(), methods=methods, settings={m: settings(m) for m in methods}, sigmas=list(SIGMAS),
                seeds=seeds, lr=3e-3, bs=32, width=64, optimiser='Adam, fit_one_cycle', loss='MSELossFlat',
                datasets={d: dict(n_val=DATASETS[d]['n_val'], n_test=DATASETS[d]['n_test'], epochs=a.epochs or DATASETS[d]['epochs'],
                                  n=len(load(d)[1]), n_features=load(d)[0].shape[1]) for d in dss},
                smoke=bool(a.epochs or a.n_train))
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, summary=summarise(rows), rows=rows), f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
