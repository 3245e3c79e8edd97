# edgeR TMM factors of pseudobulk samples, the reference for scmlm's offset="tmm".
# Usage (from the repository root): Rscript tests/data/reference/R/tmm_factors.R
# Writes tests/data/reference/tmm/tmm_factors.csv: one row per dataset x group x sample with the pseudobulk library
# size over all genes (lib_size), calcNormFactors(DGEList(pseudobulk), method = "TMM") (norm_factor) and
# lib_size * norm_factor (eff_lib_size, the effective library size edgeR's GLM uses as its offset).
suppressPackageStartupMessages({library(Matrix); library(edgeR)})

bundled <- function(name) {  # scmlm's bundled layout: counts genes x cells, obs with cell_id
  dir <- file.path("scmlm", "datasets", "data", name)
  Y <- as(readMM(gzfile(file.path(dir, "counts.mtx.gz"))), "CsparseMatrix")
  obs <- read.csv(gzfile(file.path(dir, "obs.csv.gz")), stringsAsFactors = FALSE, colClasses = "character")
  list(Y = Y, obs = obs)
}

simulated <- function(name) {  # the reference fixtures: counts cells x genes
  dir <- file.path("tests", "data", "reference", name)
  Y <- t(as(readMM(gzfile(file.path(dir, "counts.mtx.gz"))), "CsparseMatrix"))
  obs <- read.csv(file.path(dir, "obs.csv"), stringsAsFactors = FALSE, colClasses = "character")
  obs$sample <- paste(obs$donor, obs$condition, sep = ":")
  list(Y = Y, obs = obs)
}

factors <- function(dataset, d, sample_col, group_col = NULL) {
  groups <- if (is.null(group_col)) rep("all", nrow(d$obs)) else d$obs[[group_col]]
  out <- list()
  for (g in sort(unique(groups))) {
    cells <- which(groups == g)
    s <- factor(d$obs[[sample_col]][cells])
    M <- sparseMatrix(i = seq_along(cells), j = as.integer(s), x = 1, dims = c(length(cells), nlevels(s)))
    PB <- as.matrix(d$Y[, cells, drop = FALSE] %*% M)
    colnames(PB) <- levels(s)
    y <- calcNormFactors(DGEList(PB), method = "TMM")
    out[[g]] <- data.frame(dataset = dataset, group = g, sample = levels(s), lib_size = y$samples$lib.size,
                           norm_factor = y$samples$norm.factors,
                           eff_lib_size = y$samples$lib.size * y$samples$norm.factors)
  }
  do.call(rbind, out)
}

res <- rbind(
  factors("kang2018", bundled("kang2018_muscat_2donors"), "sample_id", "cell_type"),
  factors("kang2018_100genes", bundled("kang2018_distinct_3donors_100genes"), "sample_id", "cell_type"),
  factors("sim_within_small", simulated("sim_within_small"), "sample")
)
write.csv(res, file.path("tests", "data", "reference", "tmm", "tmm_factors.csv"), row.names = FALSE)
cat(sprintf("edgeR %s, R %s: %d rows\n", packageVersion("edgeR"), getRversion(), nrow(res)))
