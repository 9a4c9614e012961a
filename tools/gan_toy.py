"""Mixup for GANs on the 2-D mode-collapse benchmarks: a plain GAN against one whose discriminator trains on mixed real/fake inputs.

One command: `python tools/gan_toy.py` trains the same small MLP generator and discriminator on a ring of 8 Gaussians
and on a grid of 25, (a) as a plain GAN and (b) with the mixup discriminator of Zhang et al. 2018 (x = lam*x_real +
(1-lam)*x_fake with target lam, lam ~ Beta(alpha, alpha)), 5 paired seeds: for a seed, both get the same initial
weights, the same real batches and the same noise (the mixing draws from a generator of its own). The mixing is
mixaug's core from plain PyTorch (`draw_mixup`, `Mix`, `Mix.targets`); no fastai Learner. At checkpoints it measures,
on a fixed set of generated samples, the modes covered and the fraction of high-quality samples. Results, the git
commit, the sources that ran and each run's wall time go to `nbs/gan_results.json`, shown by `nbs/15_gan_evidence.ipynb`.
No download: the data are generated.
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, math, multiprocessing as mp, os, platform, sys, time, warnings
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from torch import Tensor
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the mask-family experiment's helpers, one copy for every evidence tool: value hashes, paired statistics, provenance
from mask_family import sha, mean_sd, paired, git_state, engine_match, loaded_sources
from mixaug.core import draw_mixup

warnings.filterwarnings('ignore')
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---------------------------------------------------------------- data: the two benchmarks (the usual layout: a ring of radius 2, a grid of spacing 2)
SD = .05  # every mode's standard deviation
def ring_modes(k:int=8, radius:float=2.) -> Tensor:
    "`k` centres equally spaced on a circle of `radius`, the first at (radius, 0)"
    a = torch.arange(k, dtype=torch.float64)*2*math.pi/k
    return torch.stack([radius*a.cos(), radius*a.sin()], 1)

def grid_modes(side:int=5, spacing:float=2.) -> Tensor:
    "`side`x`side` centres `spacing` apart, centred on the origin (for 5 and 2: -4, -2, 0, 2, 4 on each axis)"
    v = (torch.arange(side, dtype=torch.float64) - (side-1)/2)*spacing
    return torch.cartesian_prod(v, v)

BENCHMARKS = {'ring': ring_modes, 'grid': grid_modes}

def sample(modes:Tensor, n:int, sd:float=SD, generator:torch.Generator|None=None) -> tuple[Tensor,Tensor]:
    "`n` points of the equal mixture of Gaussians N(`modes[k]`, `sd`² I) as float32, and the mode each came from"
    k = torch.randint(len(modes), (n,), generator=generator)
    return (modes[k].float() + sd*torch.randn(n, 2, generator=generator)),k

# ---------------------------------------------------------------- the two metrics
def nearest(x:Tensor, modes:Tensor) -> tuple[Tensor,Tensor]:
    "Each point's nearest mode and its distance to it (float64)"
    d = torch.cdist(x.double(), modes.double())
    dist,k = d.min(1)
    return k,dist

MIN_COUNT = 20  # a mode is covered when at least this many of the generated samples lie within 3 sd of it (PacGAN's rule)
N_EVAL = 2500   # generated samples per checkpoint
N_SHOWN = 500   # of them kept in the result file, for the figures

def mode_stats(x:Tensor, modes:Tensor, sd:float=SD, min_count:int=MIN_COUNT) -> dict:
    "Modes covered (>= `min_count` samples within 3 `sd` of it), the fraction of high-quality samples (within 3 `sd` of a mode) and the count per mode"
    k,dist = nearest(x, modes)
    good = dist <= 3*sd  # modes are far more than 6 sd apart: a point is within 3 sd of at most one
    counts = torch.bincount(k[good], minlength=len(modes))
    return dict(modes=int((counts >= min_count).sum()), high_quality=float(good.double().mean()) if len(x) else 0., counts=counts.tolist())

# ---------------------------------------------------------------- models
Z_DIM,WIDTH = 2,128
def mlp(n_in:int, n_out:int, width:int=WIDTH, layers:int=3) -> nn.Module:
    "`layers` hidden layers of `width` ReLU units"
    ls,d = [],n_in
    for _ in range(layers): ls += [nn.Linear(d, width), nn.ReLU()]; d = width
    return nn.Sequential(*ls, nn.Linear(d, n_out))

# ---------------------------------------------------------------- the discriminator's objectives
ALPHA = .2  # the mixup paper's alpha for GANs

def plain_d_loss(disc:nn.Module, real:Tensor, fake:Tensor, generator=None) -> Tensor:
    "The GAN discriminator's loss: binary cross-entropy, target 1 on the real batch and 0 on the fake one, over the 2n samples"
    x,y = torch.cat([real, fake]),torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)])
    return F.binary_cross_entropy_with_logits(disc(x), y)

def mix_real_fake(real:Tensor, fake:Tensor, alpha:float=ALPHA, generator=None) -> tuple:
    "The 2n inputs and targets of the mixup discriminator: each real sample mixed with its fake and each fake with its real, lam ~ Beta(`alpha`, `alpha`); the `Mix`"
    n = len(real)
    x,y = torch.cat([real, fake]),torch.cat([torch.ones(n, 1), torch.zeros(n, 1)])
    idx = torch.cat([torch.arange(n, 2*n), torch.arange(n)])  # real i with fake i, and fake i with real i
    mix = draw_mixup(2*n, alpha=alpha, fold=False, idx=idx, generator=generator)  # not folded: the real share ranges over (0, 1)
    (ym,),_ = mix.targets((y,), F.binary_cross_entropy_with_logits)  # the loss is linear in the target: interpolated targets are exact
    return mix(x),ym,mix

def mixup_d_loss(disc:nn.Module, real:Tensor, fake:Tensor, generator=None, alpha:float=ALPHA) -> Tensor:
    "The mixup discriminator's loss: binary cross-entropy of `disc` on lam*real + (1-lam)*fake against target lam, over 2n mixes"
    xm,ym,_ = mix_real_fake(real, fake, alpha, generator)
    return F.binary_cross_entropy_with_logits(disc(xm), ym)

METHODS = {'GAN': plain_d_loss, 'mixup GAN': mixup_d_loss}

def g_loss(disc:nn.Module, fake:Tensor) -> Tensor:
    "The generator's non-saturating loss, -log D(G(z)), on the fake batch as it is (the same for both methods)"
    return F.binary_cross_entropy_with_logits(disc(fake), torch.ones(len(fake), 1))

# ---------------------------------------------------------------- training
STEPS,EVERY,BS,LR = 3000,200,256,1e-3

def run(bench:str, method:str, seed:int, steps:int=STEPS, every:int=EVERY, bs:int=BS, lr:float=LR, n_eval:int=N_EVAL, sd:float=SD) -> dict:
    "Train `method` on `bench` with `seed`; the modes covered and high-quality fraction at every `every` steps, the final samples, and hashes of what was paired"
    start = time.perf_counter()
    torch.set_num_threads(1)
    modes = BENCHMARKS[bench]()
    torch.manual_seed(seed)
    gen,disc = mlp(Z_DIM, 2),mlp(2, 1)
    init = sha(*gen.state_dict().values(), *disc.state_dict().values())
    og = torch.optim.Adam(gen.parameters(), lr, betas=(.5, .999))
    od = torch.optim.Adam(disc.parameters(), lr, betas=(.5, .999))
    data_g = torch.Generator().manual_seed(seed)          # real batches and the generator's noise: the same for both methods
    mix_g = torch.Generator().manual_seed(10_000 + seed)  # the mixing's own draws
    z_eval = torch.randn(n_eval, Z_DIM, generator=torch.Generator().manual_seed(20_000 + seed))
    h = hashlib.sha1()
    curve = []
    def measure(step):
        with torch.no_grad(): x = gen(z_eval)
        s = mode_stats(x, modes, sd)
        curve.append(dict(step=step, modes=s['modes'], high_quality=s['high_quality']))
        return x
    measure(0)
    d_loss = METHODS[method]
    for step in range(1, steps+1):
        real,_ = sample(modes, bs, sd, generator=data_g)
        z_d,z_g = torch.randn(bs, Z_DIM, generator=data_g),torch.randn(bs, Z_DIM, generator=data_g)
        h.update(real.numpy().tobytes()); h.update(z_d.numpy().tobytes()); h.update(z_g.numpy().tobytes())
        with torch.no_grad(): fake = gen(z_d)
        ld = d_loss(disc, real, fake, generator=mix_g)
        od.zero_grad(); ld.backward(); od.step()
        lg = g_loss(disc, gen(z_g))
        og.zero_grad(); lg.backward(); og.step()
        if step % every == 0 or step == steps: x = measure(step)
    last = mode_stats(x, modes, sd)
    return dict(benchmark=bench, method=method, seed=seed, curve=curve, final_modes=last['modes'], final_high_quality=last['high_quality'],
                final_counts=last['counts'], final_samples=np.round(x[:N_SHOWN].numpy().astype(np.float64), 3).tolist(),  # the first N_SHOWN, for the scatter
               
                init_sha=init, batches_sha=h.hexdigest()[:12], eval_noise_sha=sha(z_eval), seconds=time.perf_counter()-start)

# ---------------------------------------------------------------- statistics
BASE = 'GAN'  # the paired differences are mixup GAN - GAN

def over_training(row:dict, key:str) -> float:
    "The mean of `key` over the checkpoints after step 0 (the area under the curve, per checkpoint)"
    return float(np.mean([c[key] for c in row['curve'] if c['step'] > 0]))

def summarise(rows:list) -> dict:
    "Per benchmark and method: final modes and high-quality fraction, their means over training, mean ± sd over seeds; mixup GAN - GAN, paired by seed, with wins/ties/losses"
    out = {}
    for b in dict.fromkeys(r['benchmark'] for r in rows):
        rs = [r for r in rows if r['benchmark']==b]
        out[b] = {}
        vals = {}
        for m in dict.fromkeys(r['method'] for r in rs):
            by = {r['seed']: r for r in rs if r['method']==m}
            vals[m] = {'final_modes': {s: r['final_modes'] for s,r in by.items()}, 'final_high_quality': {s: r['final_high_quality'] for s,r in by.items()},
                       'mean_modes': {s: over_training(r, 'modes') for s,r in by.items()},
                       'mean_high_quality': {s: over_training(r, 'high_quality') for s,r in by.items()}}
            out[b][m] = {k: mean_sd([v[s] for s in sorted(v)]) for k,v in vals[m].items()}
        other = [m for m in vals if m!=BASE]
        for m in other:
            d = {}
            for k in vals[m]:
                p = paired(vals[m][k], vals[BASE][k])
                p['wins'],p['ties'],p['losses'] = (sum(v>0 for v in p['values']), sum(v==0 for v in p['values']), sum(v<0 for v in p['values']))
                d[k] = p
            out[b][f'{m} - {BASE}'] = d
    return out

def curves(rows:list) -> dict:
    "Per benchmark and method, at each checkpoint: the mean, min and max over seeds of both metrics"
    out = {}
    for b in dict.fromkeys(r['benchmark'] for r in rows):
        out[b] = {}
        for m in dict.fromkeys(r['method'] for r in rows if r['benchmark']==b):
            rs = sorted((r for r in rows if r['benchmark']==b and r['method']==m), key=lambda r: r['seed'])
            steps = [c['step'] for c in rs[0]['curve']]
            out[b][m] = dict(step=steps, **{f'{k}_{f}': [float(g([r['curve'][i][k] for r in rs])) for i in range(len(steps))]
                                              for k in ('modes','high_quality') for f,g in (('mean',np.mean),('min',np.min),('max',np.max))})
    return out

def _run(args): return run(*args)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--benchmarks', default=','.join(BENCHMARKS))
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--steps', type=int, default=STEPS)
    p.add_argument('--every', type=int, default=EVERY)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--out', default=os.path.join(ROOT, 'nbs', 'gan_results.json'))
    a = p.parse_args(argv)
    start = time.time()
    torch.set_num_threads(1)
    git = git_state() | engine_match()
    bs_,methods,seeds = a.benchmarks.split(','),a.methods.split(','),list(range(a.seeds))
    jobs = [(b,m,s,a.steps,a.every) for b in bs_ for s in seeds for m in methods]
    rows = []
    with mp.get_context('fork').Pool(a.workers) as pool:
        for r in pool.imap_unordered(_run, jobs):
            rows.append(r)
            print(f"{len(rows)}/{len(jobs)} {r['benchmark']} {r['method']} seed={r['seed']}: {r['final_modes']} modes, "
                  f"{r['final_high_quality']:.3f} high quality ({r['seconds']:.1f} s)", flush=True)
    key = {(b,m,s):i for i,(b,m,s,*_) in enumerate(jobs)}
    rows.sort(key=lambda r: key[(r['benchmark'],r['method'],r['seed'])])
    import fastai, mixaug
    meta = dict(command=' '.join(['python tools/gan_toy.py']+(argv if argv is not None else sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), git=git, git_after=git_state() | engine_match(),
                sources=loaded_sources(), seconds=time.time()-start, run_seconds=sum(r['seconds'] for r in rows), workers=a.workers,
                threads_per_process=1, torch=torch.__version__, fastai=fastai.__version__, mixaug=mixaug.__version__,
                python=platform.python_version(), methods=methods, base=BASE, seeds=seeds, benchmarks=bs_,
                settings=dict(steps=a.steps, every=a.every, bs=BS, lr=LR, betas=[.5, .999], optimiser='Adam', alpha=ALPHA, fold=False,
                              z_dim=Z_DIM, width=WIDTH, layers=3, sd=SD, ring=dict(k=8, radius=2.), grid=dict(side=5, spacing=2.),
                              n_eval=N_EVAL, min_count=MIN_COUNT, d_steps_per_g_step=1, g_loss='non-saturating, -log D(G(z))'),
                smoke=a.steps!=STEPS or a.seeds!=5)
    with open(a.out, 'w') as f: json.dump(dict(meta=meta, summary=summarise(rows), curves=curves(rows), rows=rows), f, indent=1)
    print('wrote', os.path.abspath(a.out), f"in {meta['seconds']:.0f} s")

if __name__ == '__main__': main()
