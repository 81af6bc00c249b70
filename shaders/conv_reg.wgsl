// The register kernels of conv.wgsl for every adapter: entry points over its *_block
// functions, and their loads of the operand shared along a row or column. A workgroup of 8x8
// invocations covers 64 x 64 outputs. conv_sg.wgsl has the same kernels for adapters with
// subgroups.

// The 8 values of binding b at lo + k and hi + k (the weights of 8 columns at reduction index
// k), one load each; `own` (this lane's own one of the 8) serves the subgroup version.
fn load8_b(lo: vec4<u32>, hi: vec4<u32>, own: u32, k: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(
        vec4<f32>(f32(b[lo.x + k]), f32(b[lo.y + k]), f32(b[lo.z + k]), f32(b[lo.w + k])),
        vec4<f32>(f32(b[hi.x + k]), f32(b[hi.y + k]), f32(b[hi.z + k]), f32(b[hi.w + k])),
    );
}

// The same from binding a (dy of 8 output channels at one position, in the weight gradient).
fn load8_a(lo: vec4<u32>, hi: vec4<u32>, own: u32, k: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(
        vec4<f32>(f32(a[lo.x + k]), f32(a[lo.y + k]), f32(a[lo.z + k]), f32(a[lo.w + k])),
        vec4<f32>(f32(a[hi.x + k]), f32(a[hi.y + k]), f32(a[hi.z + k]), f32(a[hi.w + k])),
    );
}

@compute @workgroup_size(8, 8)
fn conv2d_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = p.row_base + (wid.x * 8u + lid.x) * 8u;
    let col0 = (wid.y * 8u + lid.y) * 8u;
    if (col0 >= p.c_out / p.groups || row0 >= p.n * p.oh * p.ow) {
        return;
    }
    conv_fwd_block(wid.z, row0, col0, 0u);
}

@compute @workgroup_size(8, 8)
fn conv2d_bwd_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = p.row_base + (wid.x * 8u + lid.x) * 8u;
    let col0 = (wid.y * 8u + lid.y) * 8u;
    if (col0 >= p.c_in / p.groups || row0 >= p.n * p.h * p.w) {
        return;
    }
    conv_bwd_input_block(wid.z, row0, col0, 0u);
}

// Rows (output channels) on lid.y, columns (ci, ky, kx) on lid.x.
@compute @workgroup_size(8, 8)
fn conv2d_bwd_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col0 = (wid.x * 8u + lid.x) * 8u;
    let row0 = p.row_base + (wid.y * 8u + lid.y) * 8u;
    if (col0 >= p.c_in / p.groups * p.kh * p.kw || row0 >= p.c_out / p.groups) {
        return;
    }
    conv_bwd_weight_block(wid.z / p.splits, wid.z % p.splits, row0, col0, 0u);
}
