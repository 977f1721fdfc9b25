import time, jax, jax.numpy as jnp, sys
sys.path.insert(0, ".")
from mamba_jax.ops import selective_scan
print(jax.devices())
rel = lambda a,b: float(jnp.linalg.norm((a-b).astype(jnp.float32).ravel())/jnp.linalg.norm(b.astype(jnp.float32).ravel()))
def inputs(key, b, l, d, n, g, dtype=jnp.float32):
    ks = jax.random.split(key, 10)
    u = jax.random.normal(ks[0], (b,l,d), dtype)
    dl = (jax.random.normal(ks[1], (b,l,d))*0.5 - 1.0).astype(dtype)
    A = -jnp.exp(jax.random.normal(ks[2], (d,n)))
    B = jax.random.normal(ks[3], (b,l,g,n), dtype); C = jax.random.normal(ks[4], (b,l,g,n), dtype)
    D = jax.random.normal(ks[5], (d,)); z = jax.random.normal(ks[6], (b,l,d), dtype)
    bias = jax.random.normal(ks[7], (d,))*0.1; h0 = jax.random.normal(ks[8], (b,d,n))
    return u, dl, A, B, C, D, z, bias, h0
def f(impl):
    def fn(*a):
        return selective_scan(*a[:7], delta_bias=a[7], delta_softplus=True, initial_state=a[8], return_final_state=True, impl=impl)
    return fn
def loss(fn):
    def L(*a):
        y, h = fn(*a)
        return jnp.sum(y.astype(jnp.float32)*jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))) + jnp.sum(h*h)
    return L
for (b,l,d,n,g,dt) in [(2,131,96,16,2,jnp.float32),(1,1000,256,16,1,jnp.bfloat16),(1,1,64,5,1,jnp.float32)]:
    a = inputs(jax.random.key(1), b,l,d,n,g,dt)
    r = jax.jit(f("reference"))(*a); p = jax.jit(f("pallas"))(*a)
    gr = jax.jit(jax.grad(loss(f("reference")), argnums=tuple(range(9))))(*a)
    gp = jax.jit(jax.grad(loss(f("pallas")), argnums=tuple(range(9))))(*a)
    print((b,l,d,n,g,dt.__name__), "y", rel(p[0],r[0]), "hT", rel(p[1],r[1]), "grads", [f"{rel(x,y):.1e}" for x,y in zip(gp,gr)])
import triton.testing as tt
for (b,l,d) in [(1,4096,1024),(4,16384,2048)]:
    a = inputs(jax.random.key(2), b,l,d,16,1,jnp.bfloat16)
    for impl in ["pallas","chunked"]:
        fw = jax.jit(f(impl)); bw = jax.jit(jax.grad(loss(f(impl)), argnums=tuple(range(9))))
        def tm(fn):
            jax.block_until_ready(fn(*a)); t=time.perf_counter(); 
            for _ in range(5): out = fn(*a)
            jax.block_until_ready(out); return (time.perf_counter()-t)/5*1e3
        print(b,l,d,impl, "fwd ms %.3f"%tm(fw), "fwd+bwd ms %.3f"%tm(bw))
